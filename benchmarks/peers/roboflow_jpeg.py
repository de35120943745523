"""Roboflow ``inference``'s ``InferencePipeline`` doing JPEG q85 of every frame of a clip.

Run with the Python of a separate venv that has ``pip install inference`` (see
``benchmarks/README.md``), not framepipe's: ``python roboflow_jpeg.py CLIP [--quality 85]``.
Prints one JSON line on stdout: ``{"frames": N, "seconds": S, "fps": F, "bytes": B,
"cpu_seconds": C, "version": "..."}``, seconds and CPU (this process, all threads) from
``start()`` to ``join()``. The handler is ``InferencePipeline.init_with_custom_logic``'s
``on_video_frame``: ``cv2.imencode`` of the numpy BGR image the pipeline hands it, the length kept
as the "prediction". Telemetry, usage reporting and model downloads are switched off by
environment variables set before ``inference`` is imported; no model is used.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

OFFLINE = {
    "OFFLINE_MODE": "True",
    "METRICS_ENABLED": "False",
    "OTEL_METRICS_ENABLED": "False",
    "DISABLE_VERSION_CHECK": "True",
    "INFERENCE_WARNINGS_DISABLED": "True",
    "DISABLE_INFERENCE_CACHE": "True",
    "LOG_LEVEL": "ERROR",
}


def _cpu() -> float:
    """User + system CPU time of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip")
    parser.add_argument("--quality", type=int, default=85)
    args = parser.parse_args()
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)

    from importlib.metadata import version

    import cv2
    from inference import InferencePipeline

    params = [cv2.IMWRITE_JPEG_QUALITY, args.quality]
    frames = 0
    total = 0

    def on_video_frame(video_frames):  # type: ignore[no-untyped-def]
        out = []
        for video_frame in video_frames:
            ok, buffer = cv2.imencode(".jpg", video_frame.image, params)
            if not ok:
                raise RuntimeError("imencode failed")
            out.append({"jpeg_bytes": len(buffer)})
        return out

    def on_prediction(predictions, video_frames):  # type: ignore[no-untyped-def]
        nonlocal frames, total
        items = predictions if isinstance(predictions, list) else [predictions]
        for prediction in items:
            if prediction is not None:
                frames += 1
                total += prediction["jpeg_bytes"]

    pipeline = InferencePipeline.init_with_custom_logic(
        video_reference=args.clip,
        on_video_frame=on_video_frame,
        on_prediction=on_prediction,
    )
    cpu0 = _cpu()
    t0 = time.perf_counter()
    pipeline.start()
    pipeline.join()
    seconds = time.perf_counter() - t0
    cpu = _cpu() - cpu0
    json.dump(
        {
            "frames": frames,
            "seconds": seconds,
            "fps": frames / seconds,
            "bytes": total,
            "cpu_seconds": cpu,
            "version": version("inference"),
        },
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    main()
