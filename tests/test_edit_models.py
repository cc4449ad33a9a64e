"""Edit pipelines calibrate with input images: ``Calibration(images=)``, checked up front, passed to the pipeline
as ``image=`` (prompt i edits image i mod n); an edit pipeline without images is refused before any work. On a
tiny FLUX.1 Kontext pipeline (FLUX's transformer and adapter; the input image's tokens join the latents')."""

from __future__ import annotations

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch

import svdquant
from svdquant import SVDQLinear
from svdquant.models.pipeline_needs import needs_images

RECIPE = svdquant.W4A4Config(iterations=1, eval_tokens=64)


def calib(**kw):
    return svdquant.Calibration(**{**dict(prompts=["a cat", "a dog"], steps=2, snapshots=3,
                                          pipeline_kwargs=dict(tm.KONTEXT_KWARGS)), **kw})


def test_kontext_calibrates_on_the_input_images_through_the_pipeline(monkeypatch):
    pipe = tm.build_kontext_pipeline()
    assert needs_images(pipe)
    images = [tm.input_image(0), tm.input_image(1)]
    seen = []
    # what the transformer reads: 16 latent tokens, then 16 tokens of the input image
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["hidden_states"].shape[1]),
                                                        with_kwargs=True)
    calls = []
    orig = type(pipe).__call__

    def recording(self, *args, **kwargs):  # the real call, its image argument noted
        calls.append(kwargs.get("image"))
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", recording)
    try:
        report = svdquant.quantize(pipe, RECIPE, calib(images=images), progress=False)
    finally:
        handle.remove()
    assert report.snapshots == 3
    assert seen and set(seen) == {32}
    assert [c is images[i] for i, c in enumerate(calls)] == [True] * len(calls) and len(calls) == 2
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q) is SVDQLinear
    with torch.no_grad():
        out = pipe(prompt="a cat", image=images[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                   output_type="pt", **tm.KONTEXT_KWARGS).images
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()


def test_edit_pipeline_without_images_is_refused_before_any_work():
    pipe = tm.build_kontext_pipeline()
    called = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *a: called.append(1))
    with pytest.raises(ValueError, match=r"FluxKontextPipeline edits an input image.*Calibration\(images="):
        svdquant.quantize(pipe, RECIPE, calib(), progress=False)
    handle.remove()
    assert not called and not any(isinstance(m, SVDQLinear) for m in pipe.transformer.modules())


def test_images_for_a_pipeline_that_takes_none_are_refused():
    pipe = tm.build_flux_pipeline()
    with pytest.raises(ValueError, match="FluxPipeline takes no input image"):
        svdquant.quantize(pipe, RECIPE, calib(images=[tm.input_image()], pipeline_kwargs=dict(tm.PIPE_KWARGS)),
                          progress=False)


def test_image_paths_are_opened_and_checked(tmp_path):
    tm.input_image().save(tmp_path / "a.png")
    c = svdquant.Calibration(images=[tmp_path / "a.png", str(tmp_path / "a.png")])
    assert [im.size for im in c.images] == [(16, 16), (16, 16)] and all(im.mode == "RGB" for im in c.images)


@pytest.mark.parametrize("images, message", [
    ("x.png", "takes a list of images"),
    ([], "is empty"),
    (["/no/such/file.png"], "no such file"),
    ([3], "must be PIL images or image file paths"),
])
def test_bad_images_are_one_line_errors(images, message):
    with pytest.raises(ValueError, match=message) as e:
        svdquant.Calibration(images=images)
    assert "\n" not in str(e.value)


def test_unreadable_image_and_folder(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot be read as an image"):
        svdquant.Calibration(images=[tmp_path / "bad.png"])
    with pytest.raises(ValueError, match="is a folder"):
        svdquant.Calibration(images=[tmp_path])


def test_image_in_pipeline_kwargs_and_images_clash():
    with pytest.raises(ValueError, match="give the images as images="):
        svdquant.Calibration(images=[tm.input_image()], pipeline_kwargs={"image": tm.input_image()})


def test_a_size_asked_of_kontext_is_the_size_calibrated():
    """FLUX.1 Kontext reads height and width as an aspect ratio and draws max_area pixels (1024² by default): the size
    given is passed as the area too, in calibration as in `svdquant generate`."""
    pipe = tm.build_kontext_pipeline()
    c = svdquant.Calibration(pipeline_kwargs=dict(height=32, width=48)).for_pipeline(pipe)
    assert c.pipeline_kwargs == dict(height=32, width=48, max_area=32 * 48)
    c = svdquant.Calibration(pipeline_kwargs=dict(height=32, width=48, max_area=64 * 64)).for_pipeline(pipe)
    assert c.pipeline_kwargs["max_area"] == 64 * 64  # given: kept
    flux = tm.build_flux_pipeline()  # no max_area: nothing added
    assert svdquant.Calibration(pipeline_kwargs=dict(height=32)).for_pipeline(flux).pipeline_kwargs == dict(height=32)


def test_kontext_streamed_on_the_cpu_calls_its_vae_through_the_streaming_hooks():
    """``device="cpu"`` runs the streaming code, every move a no-op. The input image's ``vae.encode`` is a call of
    the streamed VAE, as its forward would be (on a GPU its weights then cross for it: see the GPU test below), so
    the text encoders' pass ahead stops there as at the transformer: the VAE encodes once per calibration call, as
    unstreamed. The quantized transformer is bit for bit the unstreamed one, and the VAE is left as it was."""
    images = [tm.input_image(0), tm.input_image(1)]
    plain, streamed = tm.build_kontext_pipeline(), tm.build_kontext_pipeline()
    runs = []
    for pipe in (plain, streamed):
        runs.append([])
        pipe.vae.encoder.register_forward_pre_hook(lambda m, a, seen=runs[-1]: seen.append(1))
    svdquant.quantize(plain, RECIPE, calib(images=images), progress=False)
    svdquant.quantize(streamed, RECIPE, calib(images=images), progress=False, device="cpu")
    assert runs[0] and len(runs[1]) == len(runs[0])
    a, b = plain.transformer.state_dict(), streamed.transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not {"encode", "decode", "forward"} & set(streamed.vae.__dict__)
    assert (len(streamed.vae._forward_pre_hooks), len(streamed.vae._forward_hooks)) == (0, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cap", [None, "1GB"])
def test_gpu_kontext_streamed_through_the_gpu(cap):
    """Kontext held in CPU memory, calibrated streamed through the GPU: with the whole GPU the text encoders are
    held there through the pass ahead and the blocks stay between calls, so diffusers makes its inputs on the GPU,
    the input image for ``vae.encode`` included (a call that is not the VAE's forward: it failed there, the VAE's
    weights at home, until ``encode`` ran under the streaming hooks too); with a 1 GB cap nothing stays. Either way
    it calibrates and leaves every weight home."""
    pipe = tm.build_kontext_pipeline()
    report = svdquant.quantize(pipe, RECIPE, calib(images=[tm.input_image(0), tm.input_image(1)]), progress=False,
                               device="cuda", max_gpu_memory=cap)
    assert report.snapshots == 3
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q) is SVDQLinear
    assert {p.device.type for p in pipe.vae.parameters()} == {"cpu"}
