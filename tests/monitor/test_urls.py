"""One home for what a URL's scheme means and what of it is secret."""
import pytest

from monitor import urls
from monitor.config import parse_config


@pytest.mark.parametrize("scheme", sorted(urls.LIVE_SCHEMES))
def test_every_live_scheme_the_reader_knows_is_accepted_by_the_config(scheme, tmp_path):
    config = parse_config({"cameras": {"cam": {"source": f"{scheme}://10.0.0.7/stream", "scene": "s"}},
                           "scenes": {"s": {"bank": "s.bank"}}}, base_dir=tmp_path, check_files=False)
    camera = config.cameras["cam"]
    assert camera.is_live and camera.effective_mode == "live" and urls.is_live(camera.source)


def test_scrub_hides_the_password_in_every_form_and_keeps_one_line():
    url = "rtsp://admin:p%40ss%2Fw0rd@10.0.0.7/live"
    echoed = f"Error opening {url}:\n  401 for user admin with p@ss/w0rd (raw p%40ss%2Fw0rd)"
    shown = urls.scrub(echoed, url)
    assert "p@ss/w0rd" not in shown and "p%40ss%2Fw0rd" not in shown and "\n" not in shown
    assert "rtsp://***@10.0.0.7/live" in shown


def test_a_plain_file_name_with_an_at_sign_survives():
    assert urls.redact_url("videos/cam@2.mp4") == "videos/cam@2.mp4"
    assert urls.scheme("videos/cam@2.mp4") == "" and not urls.is_live("videos/cam@2.mp4")
