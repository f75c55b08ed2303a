"""The `spade-monitor` command. User mistakes end in one line on stderr, never a traceback."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def _model_args(p: argparse.ArgumentParser, default_preset: str) -> None:
    from engine.names import BACKBONE_NAMES, PRECISIONS, PRESET_NAMES  # torch-free: --help stays fast

    g = p.add_argument_group("model")
    g.add_argument("--preset", default=default_preset, choices=PRESET_NAMES,
                   help=f"settings to start from (default: {default_preset})")
    g.add_argument("--backbone", help=", ".join(BACKBONE_NAMES) + " (default: the preset's)")
    g.add_argument("--weights", help="backbone weights file (default: packaged or torch hub cache)")
    g.add_argument("--levels", help="pyramid levels, comma-separated, from s4,s8,s16,s32 (default: the preset's)")
    g.add_argument("--k-image", type=int, help="K of the DN2 gate (default: the preset's)")
    g.add_argument("--k-pixel", type=int, help="K nearest frames searched by pixel matching (default: the preset's)")
    g.add_argument("--motion-weight", type=float, metavar="W",
                   help="weight of each cell's optical-flow velocity in its features, 0 = off (default: the preset's)")
    g.add_argument("--frame-size", help="HxW full-frame model input (default: the preset's; camera: native size)")
    g.add_argument("--max-frames", type=int, help="reference frames kept per bank (default: 5000)")
    g.add_argument("--subsample", choices=["uniform", "kcenter"],
                   help="how --max-frames reduces the bank: uniform, or a k-center coreset that keeps "
                        "rare normal frames (default: uniform)")
    g.add_argument("--batch-size", type=int, help="frames per backbone pass (default: 16)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    g.add_argument("--precision", default="auto", choices=PRECISIONS, help=_PRECISION_HELP)


_PRECISION_HELP = ("backbone arithmetic; auto: bf16 on CPUs with native bf16, fp16 on CUDA, else fp32 "
                   "(default: auto)")


def _config_from(args):
    from engine.errors import ConfigError
    from engine.spade import preset

    frame_size = None
    if args.frame_size:
        try:
            h, w = (int(v) for v in args.frame_size.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--frame-size: '{args.frame_size}' is not HxW, e.g. 256x256") from None
        frame_size = (h, w)
    return preset(
        args.preset, backbone=args.backbone, weights=args.weights,
        levels=tuple(args.levels.split(",")) if args.levels else None,
        k_image=args.k_image, k_pixel=args.k_pixel, frame_size=frame_size,
        max_frames=args.max_frames, subsample=args.subsample, batch_size=args.batch_size,
        device=args.device, precision=args.precision, motion_weight=args.motion_weight,
    )


def cmd_evaluate(args) -> int:
    from engine.evaluate import evaluate_mvtec, evaluate_video

    config = _config_from(args)
    progress = not args.quiet  # a bar on a terminal, else log lines (engine.progress)
    if args.kind == "mvtec":
        report = evaluate_mvtec(args.root, config, category=args.category, pictures=args.pictures,
                                progress=progress, log=log.info)
    else:
        clips = [c.strip() for c in args.clips.split(",") if c.strip()] if args.clips else None
        report = evaluate_video(args.root, config, layout=args.layout, pictures=args.pictures,
                                progress=progress, log=log.info, clips=clips)
    print(report.table)
    p = report.payload
    print(f"precision {p['precision']} on {p['device']}, peak memory {p['peak_memory_mb']:.0f} MiB")
    if args.json:
        report.write_json(args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_reference_build(args) -> int:
    from engine.reference import build_reference
    from engine.spade import Spade

    _check_name(args.scene, "--scene")
    spade = Spade(_config_from(args))
    bank = build_reference(spade, args.source, args.scene, progress=not args.quiet, fps=args.fps)
    bank.save(args.out)
    t = bank.calibrated()
    print(f"scene {args.scene}: {len(bank)} frames ({bank.bytes_per_frame() / 1024:.0f} KiB each), "
          f"tau {t.tau:.4g}, theta {t.theta:.4g} -> {args.out}")
    return 0


def cmd_reference_calibrate(args) -> int:
    import getpass

    from engine.bank import ReferenceBank
    from engine.calibrate import calibrate
    from engine.spade import SpadeConfig
    from engine.versions import BankHistory

    bank = ReferenceBank.load(args.bank)
    config = SpadeConfig(**{k: v for k, v in bank.stored_config.items()
                            if k in SpadeConfig.__dataclass_fields__})
    t = calibrate(bank, config, args.image_quantile, args.pixel_quantile)
    version = BankHistory(args.bank).commit(bank, "calibrate", getpass.getuser(),
                                            {"image_quantile": t.image_quantile, "pixel_quantile": t.pixel_quantile})
    print(f"tau {t.tau:.4g} (q={t.image_quantile}), theta {t.theta:.4g} (q={t.pixel_quantile}) -> {args.bank} "
          f"(version {version})")
    return 0


def cmd_reference_history(args) -> int:
    from engine.versions import BankHistory

    history = BankHistory(args.bank)
    live = history.current()
    for version in history.versions():
        print(("* " if version.number == live else "  ") + version.describe())
    return 0


def cmd_reference_revert(args) -> int:
    import getpass

    from engine.versions import BankHistory

    number = BankHistory(args.bank).revert(args.version, getpass.getuser())
    print(f"{args.bank}: version {number} is live, the content of version {args.version}; engines reload it")
    return 0


def cmd_reference_info(args) -> int:
    from engine.bank import ReferenceBank

    bank = ReferenceBank.load(args.bank)
    info = {k: v for k, v in bank.meta.items() if k != "config"}
    info["bytes_per_frame"] = bank.bytes_per_frame()
    info["pyramid_shapes"] = {k: list(v.shape[1:]) for k, v in bank.pyramid.items()}
    print(json.dumps(info, indent=2))
    return 0


def cmd_demo_scene(args) -> int:
    from engine.datasets.synthetic import make_scene

    info = make_scene(args.out, seed=args.seed)
    print(f"synthetic scene written to {info.root}")
    return 0


def _service_config(args):
    """Load --config and apply its logging section (--log-json wins)."""
    from .config import load_config
    from .runner import setup_logging

    config = load_config(args.config)
    if getattr(args, "metrics_port", None) is not None:  # e.g. ingest and engine on one host, one config
        config.metrics.port = args.metrics_port
    import multiprocessing

    multiprocessing.current_process().name = args.command  # log tag: run, ingest or engine
    setup_logging(args.log_json or config.logging.json, config.logging.level)
    return config


def cmd_run(args) -> int:
    from .supervisor import run_service

    config = _service_config(args)
    return run_service(config, log_json=args.log_json or config.logging.json)


def cmd_ingest(args) -> int:
    from .runner import _require_redis, run_ingest, select_cameras, stop_on_signals

    config = _service_config(args)
    _require_redis(config, "ingest")
    cameras = select_cameras(config, args.camera)
    config.redis.connection_url()  # an unset password_env fails here, in one line
    with stop_on_signals() as stop:
        return run_ingest(config, cameras, stop)


def cmd_engine(args) -> int:
    from .runner import _require_redis, run_engine, stop_on_signals

    config = _service_config(args)
    _require_redis(config, "engine")
    config.redis.connection_url()
    with stop_on_signals() as stop:
        run_engine(config, stop)
    return 0


def cmd_console(args) -> int:
    from .console.service import serve_console

    config = _service_config(args)
    return serve_console(config, address=args.address, port=args.port)


def cmd_replay(args) -> int:
    from .replay import replay
    from .runner import stop_on_signals

    with stop_on_signals() as stop:
        summary = replay(args.video, args.reference, args.out, fps=args.fps, realtime=args.realtime,
                         escalate=args.escalate, device=args.device, precision=args.precision,
                         progress=not args.quiet, overwrite=args.overwrite, stop=stop)
    print(summary.line(args.video))
    return 0


def cmd_bench(args) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number in 0..65535, got {text!r}")
    return int(text)


def _check_name(name: str, what: str) -> None:
    import re

    from engine.errors import ConfigError

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name or ""):
        raise ConfigError(f"{what} '{name}': use 1-64 letters, digits, '_', '-' or '.'")


_CONFIG_HELP = "service YAML file (see configs/example.yaml)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spade-monitor", description=__doc__)
    parser.add_argument("--log-json", action="store_true", help="log as JSON lines")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_commands in (_evaluate_commands, _reference_commands, _replay_command, _service_commands, _tool_commands):
        add_commands(sub)
    return parser


def _evaluate_commands(sub) -> None:
    ev = sub.add_parser("evaluate", help="accuracy on MVTec-AD-layout or video anomaly datasets")
    ev_sub = ev.add_subparsers(dest="kind", required=True)
    mv = ev_sub.add_parser("mvtec", help="image ROCAUC, pixel ROCAUC and PRO per category")
    mv.add_argument("--root", required=True, type=Path, help="dataset root, or one category folder")
    mv.add_argument("--category", help="evaluate only this category")
    _model_args(mv, "inspection")
    vd = ev_sub.add_parser("video", help="frame ROCAUC (micro, macro) and pixel ROCAUC")
    vd.add_argument("--root", required=True, type=Path,
                    help="dataset root in the Ped2 or ShanghaiTech Campus layout")
    vd.add_argument("--layout", choices=["ped2", "shanghaitech"], help="detected when omitted")
    vd.add_argument("--clips", metavar="NAMES",
                    help="only these test clips, comma-separated (e.g. 04,05,06: report settings chosen on "
                         "the other clips)")
    _model_args(vd, "camera")
    for p in (mv, vd):
        p.add_argument("--json", type=Path, help="write the results as JSON")
        p.add_argument("--pictures", type=Path, help="write overlays and timelines into this folder")
        p.set_defaults(func=cmd_evaluate)


def _reference_commands(sub) -> None:
    ref = sub.add_parser("reference", help="build and manage per-scene reference banks")
    ref_sub = ref.add_subparsers(dest="action", required=True)
    b = ref_sub.add_parser("build", help="build and calibrate a bank from normal frames")
    b.add_argument("--scene", required=True,
                   help="scene name recorded in the bank (1-64 letters, digits, '_', '-', '.')")
    b.add_argument("--source", required=True, action="append", help="folder of frames/images or a video (repeatable)")
    b.add_argument("--out", required=True, type=Path, help="bank file to write, e.g. banks/plaza.bank")
    b.add_argument("--fps", type=float, help="sample video sources at the camera's sampling rate "
                                             "(needed for the camera preset's temporal features)")
    _model_args(b, "camera")
    b.set_defaults(func=cmd_reference_build)
    c = ref_sub.add_parser("calibrate", help="recompute tau and theta of a bank")
    c.add_argument("bank", type=Path, help="reference bank file, updated in place")
    c.add_argument("--image-quantile", type=float,
                   help="tau = this quantile of held-out normal image scores (default: the bank's preset's, 0.99)")
    c.add_argument("--pixel-quantile", type=float,
                   help="theta = this quantile of held-out normal pixel scores (default: the bank's preset's, 0.999)")
    c.set_defaults(func=cmd_reference_calibrate)
    i = ref_sub.add_parser("info", help="print a bank's metadata")
    i.add_argument("bank", type=Path, help="reference bank file")
    i.set_defaults(func=cmd_reference_info)
    h = ref_sub.add_parser("history", help="a bank's versions: who changed it, when and how (* = live)")
    h.add_argument("bank", type=Path, help="reference bank file")
    h.set_defaults(func=cmd_reference_history)
    rv = ref_sub.add_parser("revert", help="make an earlier version of a bank live again (as a new version)")
    rv.add_argument("bank", type=Path, help="reference bank file")
    rv.add_argument("version", type=int, help="the version to bring back (see 'reference history')")
    rv.set_defaults(func=cmd_reference_revert)


def _replay_command(sub) -> None:
    from engine.names import PRECISIONS

    rp = sub.add_parser("replay", help="one video through the whole pipeline, no Redis: results, events, "
                                       "overlays and a score timeline in a folder")
    rp.add_argument("video", type=Path, help="video file to replay (mp4, avi, ...)")
    rp.add_argument("--reference", required=True, type=Path, help="the scene's reference bank")
    rp.add_argument("--out", required=True, type=Path,
                    help="output folder (results.jsonl, events.jsonl, status.jsonl, overlays, timeline)")
    rp.add_argument("--fps", type=float, help="frames sampled per second (default: every frame)")
    rp.add_argument("--realtime", action="store_true", help="pace by the video's timestamps, like a camera")
    rp.add_argument("--escalate", default="flagged", choices=["flagged", "all", "none"],
                    help="which frames get a pixel anomaly map (default: flagged)")
    rp.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    rp.add_argument("--precision", default="auto", choices=PRECISIONS, help=_PRECISION_HELP)
    rp.add_argument("--overwrite", action="store_true", help="replace the results of an earlier replay in --out")
    rp.set_defaults(func=cmd_replay)


def _service_commands(sub) -> None:
    rn = sub.add_parser("run", help="the monitor: ingest workers and the engine, supervised")
    rn.add_argument("--config", required=True, type=Path, help=_CONFIG_HELP)
    rn.set_defaults(func=cmd_run)
    ig = sub.add_parser("ingest", help="only the ingest workers (bus.kind: redis)")
    ig.add_argument("--config", required=True, type=Path, help=_CONFIG_HELP)
    ig.add_argument("--camera", action="append", metavar="ID", help="only this camera (repeatable)")
    ig.set_defaults(func=cmd_ingest)
    en = sub.add_parser("engine", help="only the engine (bus.kind: redis)")
    en.add_argument("--config", required=True, type=Path, help=_CONFIG_HELP)
    en.set_defaults(func=cmd_engine)
    for p in (rn, ig, en):
        p.add_argument("--metrics-port", type=_port, metavar="PORT",
                       help="serve /metrics, /healthz and /readyz on this port instead of metrics.port (0: off)")

    co = sub.add_parser("console", help="the operators' web console: cameras, events, evidence, feedback")
    co.add_argument("--config", required=True, type=Path, help=_CONFIG_HELP)
    co.add_argument("--address", help="bind address instead of console.address (off loopback: "
                    "set SPADE_CONSOLE_USER and SPADE_CONSOLE_PASSWORD)")
    co.add_argument("--port", type=_port, help="instead of console.port")
    co.set_defaults(func=cmd_console)


def _tool_commands(sub) -> None:
    bn = sub.add_parser("bench", help="throughput, latency and memory on this machine, from a synthetic scene")
    bn.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    bn.add_argument("--backbone", help="instead of the camera preset's (efficientnet_lite0)")
    bn.add_argument("--threads", type=int, help="torch threads, bench and engine (default: usable cores - 1, min 1)")
    bn.add_argument("--json", type=Path, help="also write every figure as JSON")
    bn.add_argument("--quick", action="store_true", help="a small run for CI smoke tests (about a minute)")
    bn.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo-scene", help="write a synthetic ShanghaiTech-style scene")
    d.add_argument("--out", required=True, type=Path, help="folder to write the scene into, e.g. runs/demo")
    d.add_argument("--seed", type=int, default=0, help="random seed of the scene (default: 0)")
    d.set_defaults(func=cmd_demo_scene)

def _setup_logging(as_json: bool) -> None:
    from .runner import setup_logging

    setup_logging(as_json)


def main(argv: list[str] | None = None) -> int:
    from engine.errors import SpadeError

    args = build_parser().parse_args(argv)
    _setup_logging(args.log_json)
    try:
        return args.func(args)
    except SpadeError as exc:
        print(f"spade-monitor: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spade-monitor: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
