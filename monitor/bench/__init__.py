"""`spade-monitor bench`: where the time goes on this machine, from data the bench makes itself.

    spade-monitor bench [--device auto|cpu|cuda] [--backbone B] [--threads N] [--json FILE] [--quick]

Everything is generated in a temporary folder: a synthetic scene (engine.datasets.synthetic), its
reference bank built from the training frames with the `camera` preset and calibrated as
`spade-monitor reference build --fps <scene fps>` does, and the scene's test clip re-encoded as
H.264 without B-frames (as many IP cameras send it), so that packets are frames, with a key frame
every GOP frames. Then, on one table:

- backbone: frames/s by batch size in the device's best mode (what FeatureExtractor picks with
  precision 'auto': bf16 autocast + channels_last on CPUs with AVX512-BF16/AMX, fp16 +
  channels_last on CUDA, else fp32; on a CPU, batches split into cache-sized passes) and in plain
  fp32 eager mode (one pass per batch), on the video's frames;
- gate: the DN2 kNN (engine.gate.knn, K = the preset's max(k_image, k_pixel)) for a batch of
  engine.max_batch frames against banks of 1k/10k/100k fp16 global features of the backbone's
  dimension, plus the camera preset's coarse gate (its cost does not depend on the bank's size),
  as a fraction of the backbone's time for that batch. The kNN's cost depends a little on the
  data (engine/gate.py re-ranks more candidates when many rows are nearly equidistant), so two
  kinds of bank are timed: "scene-like" (convex mixtures of pairs of the real bank's features,
  re-normalised: what a camera's bank looks like), which the ratio uses, and "isotropic" (random
  unit vectors, all nearly equidistant: the worst case);
- pixel matching per escalated frame for K in {1, 10, 50}: engine.matcher.anomaly_maps (with the
  search precision the engine uses for this model, Spade.search_dtype) against
  anomaly_maps_bruteforce (per frame and level, torch.cdist from every cell to the K frames'
  cells, then the minimum), on the scene bank's pyramids, with the largest absolute difference
  of the maps (and relative to the peak of the reference map). torch.cdist itself switches to
  the |x|^2 + |y|^2 - 2xy matrix-product form above 25 rows (its default compute_mode), so the
  reference is plain torch.cdist, not a naive loop;
- end to end: N file cameras playing copies of the test clip, in-process bus, directory
  publisher, monitor.runner.run_local, at about 1% and 10% escalation. Each run replays about
  frames_per_run frames in all (at least min_frames_per_camera per camera); camera i plays
  frames [start_i, start_i + M) of the clip, the starts spread over it at key frames, so the
  cameras show different moments, as real ones do (copies in step would escalate the same frames
  at the same time, and anomaly_maps shares one search among frames with the same neighbours).
  Escalation is set by a copy of the bank whose gate_tau lies halfway between the k-th and
  (k+1)-th highest gate scores of all the frames the run replays, k = rate x frames (at least
  1); the scores are computed once with Spade as the engine computes them (temporal features
  are causal, so a clip's frames score as in the whole clip, except its first, scored on its
  own). The table shows the rate obtained. Throughput mode replays the files as fast as the
  engine takes them (realtime: false); latency mode paces them (realtime: true) at 70% of the
  throughput just measured, split over the cameras, by re-timing the clips without re-encoding
  them (same pixels, same escalations). Capture-to-result latency is published_ts - capture_ts
  from results.jsonl; "p99 2nd half" leaves out the first half of the run (start-up). The
  engine worker's stage_seconds are shown per run. The latency bound is engine.max_wait_ms +
  3 x the mean time the worker spent per batch in that run;
- engine overhead (monitor/bench/overhead.py): the engine path with a null backbone (the real
  backbone's output shapes as cached random tensors, expanded: it costs about nothing) and
  everything else real: EngineWorker over an InProcessBus with batches of 32, preprocessing,
  temporal channels with each camera's state, the gate, pixel matching of the 1% of frames the
  gate_tau of a bank copy escalates, results, events, overlays and stills, the folder publisher,
  acks; 4 cameras, frames pre-generated and queued before the clock starts, ms per frame from
  the first get to the last ack (target <= 0.25 ms). Over the target, more frames run under
  cProfile and the functions with the most own time are listed;
- Redis frame bus (monitor/bench/redisbus.py): a throwaway redis-server on a loopback port, 2
  producer processes (2 cameras each) putting 240x320 frames with the live put (the Lua script
  cameras use; JPEG at the bus's default quality), one consumer taking get_batch(32) and acking:
  frames/s (target >= 2,000), the CPU per frame of each role, and the JPEG codec and Redis
  round trips one frame at a time, to say where the limit is. Not measured (None) without
  redis-server;
- memory: peak RSS of the engine process (each camera count runs in a fresh process of its
  own, so the figure is the engine's and nothing else's; per run, VmHWM is reset first),
  torch.cuda.max_memory_allocated on CUDA, and bytes per stored reference frame (file, tensors
  in memory, and the gate's cached index for banks of >= 2048 frames).

Threads: torch.set_num_threads(--threads) in this process and in the engine (engine.threads),
so the backbone-only figures use the same setting as the pipeline. The default leaves one core
to decoding: max(1, usable cores - 1), i.e. 1 on a 2-core machine, where ingest decode threads
share the cores (the engine with 1 thread was measured much faster than with 2 there).

`--json` also holds engine_overhead_ms_per_frame and bus_frames_per_s.

Pipeline efficiency = end-to-end frames/s / backbone-only frames/s, both in the best mode at the
engine's max batch; backbone-only is measured in the engine's process just before and just
after each throughput run (machines drift), and the run is divided by their mean. It is
reported for every camera count; the headline is 1% escalation with 4 cameras on CPU (16 on
CUDA).

--quick (the CI smoke test, under a minute on a 2-core CPU): a 120x160 scene, a 60-frame bank,
a 120-frame clip (120 frames per run, at least 30 per camera), batches 1/4/16, gate banks of 1k
and 10k rows at the backbone's real dimension (the 10% gate target is stated for 100k rows: the
quick run does not judge it), K in {1, 10}, 1 and 4 cameras, 640 frames (320 profiled) of engine overhead, 800 frames through
the Redis bus, short timings. The full run (about
7 minutes on a 2-core CPU): 240x320, a 120-frame bank, a 480-frame clip (480 frames per run, at
least 40 per camera), batches 1/4/8/16, 1k/10k/100k, K in {1, 10, 50}, 1, 4 and 16 cameras, 3,200 frames (800 profiled) of engine overhead, 8,000
frames through the Redis bus.
"""
from __future__ import annotations

from .common import TARGETS, Plan
from .report import main, run_bench

__all__ = ["TARGETS", "Plan", "main", "run_bench"]
