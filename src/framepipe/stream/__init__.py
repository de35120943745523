"""Live streams: stages, segments, sinks and the stream pipeline."""

from framepipe.stream.motion import MotionGate
from framepipe.stream.pipeline import StreamPipeline
from framepipe.stream.queue import FrameQueue
from framepipe.stream.segment import Segment, Segmenter
from framepipe.stream.sinks import FrameStore, Sink
from framepipe.stream.stage import Stage, StageStats

__all__ = [
    "FrameQueue",
    "FrameStore",
    "MotionGate",
    "Segment",
    "Segmenter",
    "Sink",
    "Stage",
    "StageStats",
    "StreamPipeline",
]
