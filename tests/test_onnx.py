"""OnnxModel on real ONNX models: RapidOCR's text detection model (shipped inside the
rapidocr-onnxruntime wheel: dynamic batch, height and width) and tiny models written here
byte by byte (a fixed batch axis), run by the real ONNX Runtime, in a live pipeline and in a
job step."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from conftest import need_modules
from framepipe import ExecutionStatus, JobEngine, Pipeline, Settings, StepContext
from framepipe.errors import MissingDependencyError, ModelError
from framepipe.frames import Frame
from framepipe.processors.adapters import ModelProcessor, OnnxModel
from framepipe.processors.adapters.onnx import ImageToTensor, Outputs
from framepipe.sources import PatternSource
from framepipe.stream import Sink, Stage, StreamPipeline

need_modules("onnxruntime", install="pip install 'framepipe[onnx]'")
need_modules("rapidocr_onnxruntime", install="pip install 'framepipe[ocr]'")

DET_NORMALISE = ImageToTensor(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
"""RapidOCR's own preprocessing of the detection model: (x / 255 - 0.5) / 0.5, BGR."""

FONT = cv2.FONT_HERSHEY_SIMPLEX


def detection_model_path() -> Path:
    """The text detection model inside the installed rapidocr-onnxruntime package."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    assert spec is not None and spec.submodule_search_locations
    for location in spec.submodule_search_locations:
        found = sorted((Path(location) / "models").glob("*det*.onnx"))
        if found:
            return found[0]
    pytest.fail("rapidocr_onnxruntime ships no text detection model (models/*det*.onnx)")


DET = detection_model_path()


def text_image(
    text: str, size: tuple[int, int] = (320, 96), at: tuple[int, int] = (16, 60)
) -> tuple[np.ndarray[Any, Any], tuple[int, int, int, int]]:
    """A white image (width, height) with ``text`` printed in black at ``at`` (its baseline's
    left end), and the text's box (x0, y0, x1, y1)."""
    w, h = size
    image = np.full((h, w, 3), 255, np.uint8)
    cv2.putText(image, text, at, FONT, 1.0, (0, 0, 0), 2, cv2.LINE_AA)
    (tw, th), base = cv2.getTextSize(text, FONT, 1.0, 2)
    return image, (at[0], at[1] - th, at[0] + tw, at[1] + base)


def text_map(outputs: Outputs) -> np.ndarray[Any, Any]:
    """The detection model's probability map (H x W) for one image."""
    (prob,) = outputs.values()
    assert prob.shape[0] == 1
    return prob[0]


def found_box(prob: np.ndarray[Any, Any], threshold: float = 0.5) -> tuple[int, int, int, int]:
    """The box around every pixel of the map above ``threshold``."""
    ys, xs = np.nonzero(prob > threshold)
    assert len(xs), "the model found no text"
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.fixture(scope="module")
def det() -> Iterator[OnnxModel]:
    """The detection model, one by one, loaded once for the module's function-call tests."""
    model = OnnxModel(DET, preprocess=DET_NORMALISE, name="text")
    model.setup()
    yield model
    model.teardown()


# -- tiny models with a fixed batch axis, written as ONNX protobuf --------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: int | bytes | str) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _tensor_info(name: str, shape: tuple[int | str, ...]) -> bytes:
    dims = b"".join(_field(1, _field(1, d) if isinstance(d, int) else _field(2, d)) for d in shape)
    tensor = _field(1, 1) + _field(2, dims)  # elem_type FLOAT, shape
    return _field(1, name) + _field(2, _field(1, tensor))


def tiny_model(path: Path, shape: tuple[int | str, ...], op: str = "Relu") -> Path:
    """An ONNX model of one ``op`` node from input ``x`` to output ``y``, both of ``shape``."""
    node = _field(1, "x") + _field(2, "y") + _field(3, "n") + _field(4, op)
    graph = (
        _field(1, node)
        + _field(2, "tiny")
        + _field(11, _tensor_info("x", shape))
        + _field(12, _tensor_info("y", shape))
    )
    opset = _field(1, "") + _field(2, 13)
    path.write_bytes(_field(1, 8) + _field(8, opset) + _field(7, graph))
    return path


def one_frame_only_model(path: Path) -> Path:
    """A model whose batch axis is dynamic but which can only run one frame at a time:
    ``Reshape(x, [1, 192])`` of an (N, 3, 8, 8) input fails for N > 1."""
    packed = b"".join(_varint(d) for d in (1, 192))
    shape = _field(1, 2) + _field(2, 7) + _field(7, packed) + _field(8, "shape")  # INT64 [2]
    node = _field(1, "x") + _field(1, "shape") + _field(2, "y") + _field(3, "n")
    node += _field(4, "Reshape")
    graph = (
        _field(1, node)
        + _field(2, "one_frame")
        + _field(5, shape)
        + _field(11, _tensor_info("x", ("N", 3, 8, 8)))
        + _field(12, _tensor_info("y", (1, 192)))
    )
    opset = _field(1, "") + _field(2, 13)
    path.write_bytes(_field(1, 8) + _field(8, opset) + _field(7, graph))
    return path


def identity(value: Any) -> Any:
    return value


# -- what is read from the model, and what a frame gives ------------------------------------


def test_names_shapes_and_dynamic_axes_are_read_from_the_model(det: OnnxModel) -> None:
    (x,) = det.inputs
    (y,) = det.outputs
    assert x.name == "x" and x.type == "tensor(float)" and x.dtype == np.float32
    assert x.text(x.shape) == "(?, 3, ?, ?)" and x.batch_dynamic
    assert y.text(y.shape) == "(?, 1, ?, ?)"
    assert det.providers == ("CPUExecutionProvider",)
    assert not det.batching  # batch_size 1
    assert OnnxModel(DET, batch_size=4).batching


def test_detection_map_is_high_over_printed_text_and_low_elsewhere(det: OnnxModel) -> None:
    image, (x0, y0, x1, y1) = text_image("ORDER 1042")
    (outputs,) = det.predict([image])
    prob = text_map(outputs)
    assert prob.shape == image.shape[:2]
    assert prob[y0:y1, x0:x1].max() > 0.9
    outside = np.ones_like(prob, bool)
    outside[max(0, y0 - 8) : y1 + 8, max(0, x0 - 8) : x1 + 8] = False
    assert prob[outside].mean() < 0.02
    fx0, fy0, fx1, fy1 = found_box(prob)
    assert abs(fx0 - x0) < 12 and abs(fx1 - x1) < 12 and fy0 >= y0 - 12 and fy1 <= y1 + 12
    blank = np.full_like(image, 255)
    assert text_map(det.predict([blank])[0]).max() < 0.3


def test_batches_give_the_same_outputs_as_one_by_one(det: OnnxModel) -> None:
    images = [text_image(f"TAG {i:02d}", at=(8 + 20 * i, 40 + 5 * i))[0] for i in range(6)]
    images += [text_image("WIDE", size=(256, 64), at=(30, 45))[0] for _ in range(3)]
    one_by_one = det.predict(images)
    batched = OnnxModel(DET, preprocess=DET_NORMALISE, batch_size=4)
    runs = batched.predict(images)
    # 6 images of one size in batches of 4 (4 + 2), 3 of another in one batch: 3 inferences
    assert (batched.stats.runs, batched.stats.frames) == (3, 9)
    for alone, together in zip(one_by_one, runs, strict=True):
        assert together.keys() == alone.keys()
        np.testing.assert_allclose(text_map(together), text_map(alone), atol=1e-4)
    batched.teardown()


def test_live_callers_are_batched_and_each_gets_its_own_result(det: OnnxModel) -> None:
    """Eight threads call at once, as a live stage's workers do: the frames run in shared
    inferences, yet each thread gets its own frame's map."""
    images = [text_image(f"N{i}", at=(10 + 30 * i, 70 - 4 * i))[0] for i in range(8)]
    expected = [text_map(o) for o in det.predict(images)]
    model = OnnxModel(DET, preprocess=DET_NORMALISE, batch_size=8, max_wait_ms=200)
    model.setup()
    got: dict[int, np.ndarray[Any, Any]] = {}
    start = threading.Barrier(8)

    def call(i: int) -> None:
        start.wait()
        got[i] = text_map(model.on_image(images[i]))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    model.teardown()
    assert model.stats.frames == 8 and model.stats.runs < 8
    for i in range(8):
        np.testing.assert_allclose(got[i], expected[i], atol=1e-4)


def test_hooks_shape_the_result(det: OnnxModel) -> None:
    def boxes(outputs: Outputs, frame: Any) -> dict[str, Any]:
        prob = text_map(outputs)
        return {"text": bool(prob.max() > 0.5), "box": found_box(prob), "size": frame.shape}

    model = OnnxModel(DET, preprocess=DET_NORMALISE, postprocess=boxes)
    image, _ = text_image("HELLO")
    (result,) = model.predict([image])
    assert result["text"] and result["size"] == image.shape
    # a preprocess may add the batch axis itself, or return the named input
    with_axis = OnnxModel(DET, preprocess=lambda im: DET_NORMALISE(im)[None])
    named = OnnxModel(DET, preprocess=lambda im: {"x": DET_NORMALISE(im)})
    for other in (with_axis, named):
        np.testing.assert_allclose(
            text_map(other.predict([image])[0]), text_map(det.predict([image])[0]), atol=1e-5
        )
    # uint8 tensors are converted to the model's float input
    raw = OnnxModel(DET, preprocess=lambda im: im.transpose(2, 0, 1))
    assert raw.predict([image])[0]["sigmoid_0.tmp_0"].dtype == np.float32


def test_session_options_and_providers(caplog: pytest.LogCaptureFixture) -> None:
    image, _ = text_image("OPTIONS")
    caplog.set_level(logging.WARNING, "framepipe.models")
    plain = OnnxModel(DET, preprocess=DET_NORMALISE)
    tuned = OnnxModel(
        DET,
        preprocess=DET_NORMALISE,
        providers=["CUDAExecutionProvider", ("NoSuchExecutionProvider", {"x": 1})],
        intra_op_threads=1,
        inter_op_threads=1,
        graph_optimization="disable",
    )
    # providers this onnxruntime lacks are skipped with a warning; CPU is the last resort
    assert tuned.providers == ("CPUExecutionProvider",)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "CUDAExecutionProvider is not available" in warned
    assert "NoSuchExecutionProvider is not available" in warned
    np.testing.assert_allclose(
        text_map(tuned.predict([image])[0]), text_map(plain.predict([image])[0]), atol=1e-4
    )
    with pytest.raises(ValueError, match="graph_optimization"):
        OnnxModel(DET, graph_optimization="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        OnnxModel(DET, batch_size=0)
    with pytest.raises(ValueError, match="intra_op_threads"):
        OnnxModel(DET, intra_op_threads=-1)


def test_idle_threads_sleep_unless_asked_to_spin() -> None:
    """By default ONNX Runtime's thread pools do not spin between runs (a pipeline shares
    the machine with its decoders); ``spin=True`` lets them."""
    for spin, expected in ((False, "0"), (True, "1")):
        model = OnnxModel(DET, preprocess=DET_NORMALISE, spin=spin)
        model.setup()
        try:
            options = model.model.get_session_options()
            for pool in ("intra_op", "inter_op"):
                key = f"session.{pool}.allow_spinning"
                assert options.get_session_config_entry(key) == expected
        finally:
            model.teardown()


def test_a_fixed_batch_axis_runs_frame_by_frame(tmp_path: Path) -> None:
    model = OnnxModel(
        tiny_model(tmp_path / "fixed.onnx", (1, 3, 8, 8)), batch_size=8, preprocess=identity
    )
    assert not model.batching
    samples = [np.random.default_rng(i).normal(size=(3, 8, 8)).astype(np.float32) for i in range(5)]
    results = model.predict(samples)
    assert (model.stats.runs, model.stats.frames) == (5, 5)
    for sample, result in zip(samples, results, strict=True):
        np.testing.assert_array_equal(result["y"], np.maximum(sample, 0))
    # a model without a batch axis takes and gives whole tensors
    whole = OnnxModel(tiny_model(tmp_path / "whole.onnx", (3, 8, 8)), preprocess=identity)
    np.testing.assert_array_equal(whole.predict(samples[:1])[0]["y"], np.maximum(samples[0], 0))
    np.testing.assert_array_equal(whole.run({"x": samples[1]})["y"], np.maximum(samples[1], 0))


def test_a_batch_that_fails_is_run_again_frame_by_frame(tmp_path: Path) -> None:
    model = OnnxModel(
        one_frame_only_model(tmp_path / "one.onnx"),
        preprocess=identity,
        batch_size=4,
        max_wait_ms=500,
    )
    assert model.batching
    samples = [np.full((3, 8, 8), i, np.float32) for i in range(4)]
    got: dict[int, Any] = {}
    start = threading.Barrier(4)

    def call(i: int) -> None:
        start.wait()
        got[i] = model.on_image(samples[i])["y"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    model.teardown()
    assert sorted(got) == [0, 1, 2, 3]
    for i in range(4):
        np.testing.assert_array_equal(got[i], samples[i].reshape(192))
    assert (model.stats.runs, model.stats.frames) == (4, 4)  # the batch of 4 failed
    with pytest.raises(ModelError, match=r"inference failed for input x\(2, 3, 8, 8\)"):
        model.predict(samples[:2])  # a job step's call fails whole: nothing partial


# -- what goes wrong, said clearly -----------------------------------------------------------


def test_a_bad_model_file_is_named_with_what_is_wrong(tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(ModelError, match=rf"OnnxModel\({missing}\): no such file"):
        OnnxModel(missing).setup()
    with pytest.raises(ModelError, match=rf"OnnxModel\({tmp_path}\): not a file"):
        OnnxModel(tmp_path).predict([])
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(DET.read_bytes()[:5000])
    with pytest.raises(ModelError, match=rf"OnnxModel\({corrupt}\): cannot load the model") as e:
        OnnxModel(corrupt).setup()
    assert not e.value.retryable


def test_without_onnxruntime_the_error_gives_the_pip_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an uninstalled package gives
    with pytest.raises(MissingDependencyError, match=r"pip install 'framepipe\[onnx\]'"):
        OnnxModel(DET)


def test_a_wrong_input_shape_is_named_with_both_shapes(det: OnnxModel, tmp_path: Path) -> None:
    grey = np.full((64, 64), 255, np.uint8)
    with pytest.raises(ModelError, match=r"input 'x' takes one frame of shape \(3, \?, \?\)") as e:
        OnnxModel(DET).predict([grey])
    assert str(DET) in str(e.value) and "axis 0 must be 3, not 1" in str(e.value)
    with pytest.raises(ModelError, match=r"preprocess for an array of shape \(64, 64\) raised"):
        det.predict([grey])  # a grey image for RapidOCR's three-channel normalisation
    with pytest.raises(ModelError, match=r"got an array of shape \(4,\)"):
        OnnxModel(DET, preprocess=identity).predict([np.zeros(4, np.float32)])
    # a size the model's own layers cannot take: its own error, with the model and the input
    with pytest.raises(ModelError, match=r"inference failed for input x\(1, 3, 33, 64\)"):
        det.predict([np.zeros((33, 64, 3), np.uint8)])
    fixed = OnnxModel(tiny_model(tmp_path / "fixed.onnx", (1, 3, 8, 8)))
    with pytest.raises(ModelError, match=r"\(3, 8, 8\) .*axis 1 must be 8, not 16"):
        fixed.predict([np.zeros((16, 16, 3), np.uint8)])
    with pytest.raises(ModelError, match="the model's inputs are \\['x'\\]"):
        OnnxModel(DET, preprocess=lambda im: {"image": im}).predict([grey])
    with pytest.raises(ModelError, match="cannot be converted to it without loss"):
        OnnxModel(DET, preprocess=identity).predict([np.zeros((3, 32, 32), np.complex64)])


def test_the_file_based_call_points_to_predict(det: OnnxModel, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"works on images, not files: call model\.predict"):
        asyncio.run(det.infer(tmp_path / "in.mp4", output_dir=tmp_path / "out"))


# -- in a live pipeline and in a job step ----------------------------------------------------


class Collect(Sink):
    def __init__(self) -> None:
        self.name = "collect"
        self.frames: list[Frame] = []
        self.lock = threading.Lock()

    def write(self, frame: Frame) -> None:
        with self.lock:
            self.frames.append(frame)


def label_of(seq: int) -> str:
    """Frame ``seq``'s label: its length changes from frame to frame, so a frame given its
    neighbour's result would be noticed."""
    return "TAG" + "X" * (seq % 5)


def draw_label(image: np.ndarray[Any, Any], seq: int) -> None:
    """A white label with :func:`label_of` across the middle of a pattern frame."""
    image[32:96, 16:304] = 255
    cv2.putText(image, label_of(seq), (32, 78), FONT, 1.0, (0, 0, 0), 2, cv2.LINE_AA)


def text_found(outputs: Outputs, frame: Any) -> dict[str, Any]:
    prob = text_map(outputs)
    return {"box": found_box(prob), "peak": float(prob.max())}


def test_a_live_stage_puts_each_frames_result_in_its_meta() -> None:
    sink = Collect()
    model = OnnxModel(
        DET, preprocess=DET_NORMALISE, postprocess=text_found, batch_size=4, max_wait_ms=100
    )
    source = PatternSource(
        "cam", width=320, height=128, count=24, realtime=False, moving_box=False, draw=draw_label
    )

    def bad_at_7(frame: Frame) -> Frame:
        if frame.seq == 7:
            frame.image = frame.image[:, :, 0].copy()  # one grey frame: it alone fails
        return frame

    pipeline = StreamPipeline(
        "text",
        source,
        stages=[
            Stage(bad_at_7),
            Stage(ModelProcessor(model, name="text"), workers=4, ordered=True),
        ],
        sinks=[sink],
    )
    asyncio.run(pipeline.run())
    assert [f.seq for f in sink.frames] == [s for s in range(1, 25) if s != 7]
    for frame in sink.frames:
        result = frame.meta["text"]
        x0, y0, x1, y1 = result["box"]
        (width, _), _ = cv2.getTextSize(label_of(frame.seq), FONT, 1.0, 2)
        assert result["peak"] > 0.9
        assert 32 <= x0 < 48 and y0 >= 40 and y1 <= 90, result
        assert abs(x1 - (32 + width)) < 10, (frame.seq, result)
    assert [s.errors for s in pipeline.stats[:2]] == [0, 1]  # the stages; then the sink
    assert model.stats.frames == 23 and model.stats.runs < 23  # frames ran in batches
    assert model._loaded is None  # the pipeline tore it down


def test_a_job_step_calls_the_model(settings: Settings) -> None:
    model = OnnxModel(DET, preprocess=DET_NORMALISE, postprocess=text_found, batch_size=4)
    maps = OnnxModel(DET, preprocess=DET_NORMALISE)
    pipeline = Pipeline("read_tags")

    @pipeline.step()
    def detect(ctx: StepContext) -> dict[str, Any]:
        images = [text_image(t, at=(16 + 8 * i, 60))[0] for i, t in enumerate(ctx.inputs["tags"])]
        results = model.predict(images)
        return {"boxes": [r["box"] for r in results]}

    @pipeline.step(depends_on=["detect"])
    async def blank(ctx: StepContext) -> dict[str, Any]:
        (result,) = await maps.predict_async([np.full((96, 320, 3), 255, np.uint8)])
        return {"blank_peak": float(text_map(result).max())}

    async def main() -> Any:
        async with JobEngine(settings=settings) as engine:
            return await engine.run(pipeline, {"tags": ["A1", "B22", "C333"]})

    info = asyncio.run(main())
    assert info.status is ExecutionStatus.COMPLETED, info.error
    boxes = info.data["boxes"]
    assert len(boxes) == 3
    for i, (box, tag) in enumerate(zip(boxes, ["A1", "B22", "C333"], strict=True)):
        _, (x0, _, x1, _) = text_image(tag, at=(16 + 8 * i, 60))
        assert abs(box[0] - x0) < 12 and abs(box[2] - x1) < 12
    assert info.data["blank_peak"] < 0.3


def test_pipelines_sharing_one_model_each_get_every_result() -> None:
    """Two cameras' pipelines share one model; the one that ends first tears it down while the
    other still sends frames: those load it again, and no frame fails."""
    model = OnnxModel(
        DET, preprocess=DET_NORMALISE, postprocess=text_found, batch_size=4, max_wait_ms=30
    )
    sinks = [Collect(), Collect()]

    def pipeline(index: int, count: int) -> StreamPipeline:
        source = PatternSource(
            f"cam{index}", width=320, height=128, count=count, realtime=False, draw=draw_label
        )
        stage = Stage(ModelProcessor(model, name="text"), workers=4)
        return StreamPipeline(f"text{index}", source, stages=[stage], sinks=[sinks[index]])

    short, long = pipeline(0, 6), pipeline(1, 30)

    async def main() -> None:
        await asyncio.gather(short.run(), long.run())

    asyncio.run(main())
    assert [len(s.frames) for s in sinks] == [6, 30]
    assert all(f.meta["text"]["peak"] > 0.9 for s in sinks for f in s.frames)
    assert short.stats[0].errors == long.stats[0].errors == 0
    assert model._loaded is None
