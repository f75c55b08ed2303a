#!/usr/bin/python3
"""Serve a video file over RTSP on 127.0.0.1, like a camera, for the ingest tests.

Run with the system Python (it needs gi and GstRtspServer):

    /usr/bin/python3 tests/rtsp_server.py --port 8554 --file clip.mp4 [--mount /cam] [--loop]

The file is decoded once into memory and re-encoded live (x264, no B-frames, short GOP), so
that a client connecting at any moment gets a keyframe quickly, timestamps keep increasing
across loops, and any container/codec GStreamer can decode works. Each client gets its own
pipeline starting at the first frame. Prints READY on stdout once the port is listening.
"""
from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def load_frames(path: str) -> tuple[Gst.Caps, list[bytes], float]:
    """Decode the whole file to raw I420 buffers: (caps, frames, fps)."""
    pipeline = Gst.parse_launch(
        "filesrc name=src ! decodebin ! videoconvert ! video/x-raw,format=I420 "
        "! appsink name=sink sync=false")
    pipeline.get_by_name("src").set_property("location", path)
    sink = pipeline.get_by_name("sink")
    pipeline.set_state(Gst.State.PLAYING)
    frames: list[bytes] = []
    caps = None
    try:
        while True:
            sample = sink.emit("try-pull-sample", 10 * Gst.SECOND)
            if sample is None:
                break  # EOS (or a stuck decoder: keep what we have)
            caps = sample.get_caps()
            buf = sample.get_buffer()
            ok, info = buf.map(Gst.MapFlags.READ)
            if ok:
                frames.append(bytes(info.data))
                buf.unmap(info)
        msg = pipeline.get_bus().pop_filtered(Gst.MessageType.ERROR)
        if msg is not None and not frames:
            err, _ = msg.parse_error()
            raise SystemExit(f"cannot decode {path}: {err.message}")
    finally:
        pipeline.set_state(Gst.State.NULL)
    if not frames or caps is None:
        raise SystemExit(f"no video frames decoded from {path}")
    s = caps.get_structure(0)
    ok, num, den = s.get_fraction("framerate")
    fps = num / den if ok and num > 0 and den > 0 else 10.0
    return caps, frames, fps


class FileFactory(GstRtspServer.RTSPMediaFactory):
    """One live pipeline per client: appsrc (our frames on a timer) -> x264 -> RTP."""

    def __init__(self, caps: Gst.Caps, frames: list[bytes], fps: float, loop: bool):
        super().__init__()
        self.caps, self.frames, self.fps, self.loop = caps, frames, fps, loop
        gop = max(1, round(fps))  # a keyframe every second: reconnecting clients start fast
        self.set_launch(
            "( appsrc name=src is-live=true do-timestamp=true format=time "
            "! videoconvert ! x264enc tune=zerolatency speed-preset=ultrafast bframes=0 "
            f"key-int-max={gop} ! video/x-h264,profile=constrained-baseline "
            "! rtph264pay name=pay0 pt=96 config-interval=-1 )")
        self.set_shared(False)
        self.connect("media-configure", self._on_media_configure)

    def _on_media_configure(self, _factory, media: GstRtspServer.RTSPMedia) -> None:
        appsrc = media.get_element().get_by_name_recurse_up("src")
        appsrc.set_property("caps", self.caps)
        state = {"i": 0, "timer": 0}

        def push() -> bool:
            if state["i"] >= len(self.frames):
                if not self.loop:
                    appsrc.emit("end-of-stream")
                    state["timer"] = 0
                    return False
                state["i"] = 0
            data = self.frames[state["i"]]
            state["i"] += 1
            ret = appsrc.emit("push-buffer", Gst.Buffer.new_wrapped(data))
            if ret not in (Gst.FlowReturn.OK,):
                state["timer"] = 0
                return False  # pipeline torn down (client gone)
            return True

        def stop(*_args) -> None:
            if state["timer"]:
                GLib.source_remove(state["timer"])
                state["timer"] = 0

        # A timer paces frames like a camera; do-timestamp stamps them with the running time.
        state["timer"] = GLib.timeout_add(max(1, round(1000 / self.fps)), push)
        media.connect("unprepared", stop)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--file", required=True)
    parser.add_argument("--mount", default="/cam")
    parser.add_argument("--loop", action="store_true")
    args = parser.parse_args()

    Gst.init(None)
    caps, frames, fps = load_frames(args.file)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")  # loopback only
    server.set_service(str(args.port))
    mount = args.mount if args.mount.startswith("/") else "/" + args.mount
    server.get_mount_points().add_factory(mount, FileFactory(caps, frames, fps, args.loop))
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
        return 1

    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, sig, loop.quit)
    print("READY", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
