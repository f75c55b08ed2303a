"""The runner's small parts on their own: where results go, which cameras a process takes,
status relaying through an outage, and how a child's end is told."""
from __future__ import annotations

import pytest

from engine.errors import ConfigError
from monitor.config import parse_config
from monitor.publish import DirectoryPublisher, PublishError
from monitor.runner import StatusRelay, build_publisher, select_cameras
from monitor.supervisor import _exit_text


def _config(tmp_path, **sections):
    data = {"cameras": {"a": {"source": "rtsp://127.0.0.1:9/a", "scene": "s"},
                        "b": {"source": "rtsp://127.0.0.1:9/b", "scene": "s", "enabled": False}},
            "scenes": {"s": {"bank": "x.bank"}}, **sections}
    return parse_config(data, base_dir=tmp_path, check_files=False)


def test_results_go_to_the_folder_and_nowhere_is_refused(tmp_path):
    publisher = build_publisher(_config(tmp_path, outputs={"dir": str(tmp_path / "out")}))
    assert isinstance(publisher, DirectoryPublisher)
    publisher.close()
    with pytest.raises(ConfigError, match="outputs.dir: results would go nowhere"):
        build_publisher(_config(tmp_path))


def test_a_process_takes_the_enabled_cameras_or_the_ones_asked_for(tmp_path):
    config = _config(tmp_path)
    assert select_cameras(config, None) == ["a"]
    assert select_cameras(config, ["a", "a"]) == ["a"]
    with pytest.raises(ConfigError, match="--camera b: the camera is disabled"):
        select_cameras(config, ["b"])
    with pytest.raises(ConfigError, match="--camera zz: unknown camera; expected one of a, b"):
        select_cameras(config, ["zz"])


class _Sink:
    def __init__(self):
        self.down = False
        self.published: list[tuple] = []

    def publish_status(self, camera, status, detail=""):
        if self.down:
            raise PublishError("redis at redis://127.0.0.1:1/0: publish failed (ConnectionError)")
        self.published.append((camera, status))


def test_statuses_wait_out_an_outage_in_order_and_the_current_one_is_sent_again_after_it():
    sink = _Sink()
    relay = StatusRelay(sink)
    sink.down = True
    relay("a", "offline", "gone")
    relay("a", "reconnecting", "retrying")
    relay.flush(force=True)
    assert sink.published == []  # nothing lost: still queued
    sink.down = False
    relay("a", "online", "receiving")
    relay.flush(force=True)
    assert sink.published == [("a", "offline"), ("a", "reconnecting"), ("a", "online")]  # in order
    relay("b", "online", "receiving")
    sink.down = True
    relay.flush(force=True)
    sink.down = False
    relay.flush(force=True)
    # After an outage, every camera's current status goes out again: the sink may have lost it.
    assert sink.published[3:] == [("b", "online"), ("a", "online"), ("b", "online")]


def test_a_child_killed_by_a_signal_is_named_by_it():
    assert _exit_text(-9) == "killed by SIGKILL"
    assert _exit_text(3) == "exit code 3"
