"""Sampling as trained: one schedule, from the saved config, through the real generate path.

The sampler is tested against an oracle denoiser (:mod:`mvcustom.inference.oracle`): it knows the
clean latents ``x0`` and the training schedule, whose noise levels it computes itself from the
config's numbers (DDPM's linear / scaled-linear betas and the zero-terminal-SNR rescaling,
written without diffusers), and answers every call with the exact epsilon or v of its input. DDIM driven by such a denoiser must land on ``x0``; a sampler on another schedule than
training's does not (the old helper dropped every key of the model's config and sampled with
diffusers' defaults: 166 % relative error for SD's epsilon config, 65 % for v-prediction).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mvcustom.geometry.trajectories import orbit
from mvcustom.inference.oracle import ORACLE_SCHEDULES, OracleDenoiser, reference_alphas_cumprod
from mvcustom.inference.pipeline import InferenceOptions, MVCustomPipeline
from mvcustom.models import MVCustomConfig, MVCustomModel
from mvcustom.models.schedule import build_scheduler

SCHEDULES = ORACLE_SCHEDULES
FRAMES, HW = 4, (64, 64)
#: "within a few percent" of x0 after 50 DDIM steps. Measured 3.0 % for each schedule: SD's
#: set_alpha_to_one=false ends DDIM at timestep 0's noise level, sqrt(1 - 0.99915) = 2.9 % of
#: noise. A sampler on diffusers' default schedule: 165 % / 66 % / 52 %.
TOLERANCE = 0.05


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny model saved once per schedule (the pipeline reads the schedule from the export)."""
    model = MVCustomModel.tiny(MVCustomConfig(featurenerf_blocks=[]), seed=0)
    out = {}
    for name, config in SCHEDULES.items():
        model.scheduler_config = dict(config)
        folder = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(folder)
        out[name] = folder
    return out


def _x0(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, FRAMES, 4, HW[0] // 8, HW[1] // 8, generator=g)


def _generate(pipe: MVCustomPipeline, config: dict, options: InferenceOptions, depth=None) -> float:
    cams = orbit(FRAMES, radius=2.0, span_deg=60, image_hw=HW)
    x0 = _x0()
    oracle = OracleDenoiser(x0, cams.w2c, config)
    pipe.model.forward = oracle  # the real pipeline around a perfect denoiser
    pipe.depth_estimator = depth
    out = pipe(
        "a chair",
        cams,
        num_inference_steps=50,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(1),
        options=options,
        output_type="latent",
    ).frames
    assert oracle.calls > 0
    return float((out - x0).norm() / x0.norm())


def _pipe(folder: str) -> MVCustomPipeline:
    pipe = MVCustomPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_generate_path_recovers_x0_with_an_oracle_denoiser(exports, name):
    pipe = _pipe(exports[name])
    error = _generate(pipe, SCHEDULES[name], InferenceOptions(feature_rendering=False))
    assert error < TOLERANCE, f"{name}: DDIM ended {error:.1%} away from x0"


def test_oracle_recovers_x0_with_feature_rendering_and_latent_completion(exports):
    """The anchor pass, anchor replay and latent completion all step on the training schedule too
    (completion re-noises with it): the oracle's clip still comes out."""
    pipe = _pipe(exports["sd15_epsilon"])
    opts = InferenceOptions(feature_rendering=True, anchors=(1,), depth_scale=1.0, completion_until_step=10)
    error = _generate(pipe, SCHEDULES["sd15_epsilon"], opts, depth=lambda x: np.full(x.shape[:3], 2.0))
    assert error < TOLERANCE, f"DDIM with the inference strategies ended {error:.1%} away from x0"


@pytest.mark.parametrize(("name", "at_least"), [("sd15_epsilon", 1.0), ("sd15_v", 0.4)])
def test_a_sampler_on_another_schedule_fails_the_oracle(exports, name, at_least):
    """What the old helper built (diffusers' default DDIM: linear betas, clip_sample): the oracle
    test above fails on it, and the pipeline refuses it when it is passed in."""
    from diffusers import DDIMScheduler

    pipe = _pipe(exports[name])
    with pytest.raises(ValueError, match="differs from the one"):
        MVCustomPipeline(pipe.model, DDIMScheduler())
    pipe.scheduler = DDIMScheduler()  # bypass the check: the sampler the old helper gave
    error = _generate(pipe, SCHEDULES[name], InferenceOptions(feature_rendering=False))
    assert error > at_least > TOLERANCE, error


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_training_and_inference_share_the_schedule(exports, name):
    """Training's noise (what ``jobs.train`` builds from the model) and the pipeline's sampler,
    after the export round trip: the same noise levels, equal to the formulas, and every key."""
    from mvcustom.configs.train import ModelConfig
    from mvcustom.models import build_model

    config = SCHEDULES[name]
    extra = {k: v for k, v in config.items() if k in ("rescale_betas_zero_snr", "timestep_spacing")}
    model = build_model(
        ModelConfig(featurenerf_blocks=[], prediction_type=config["prediction_type"], scheduler=extra)
    )
    training = build_scheduler(model.scheduler_config)
    sampler = _pipe(exports[name]).scheduler
    truth = torch.from_numpy(reference_alphas_cumprod(config))
    assert torch.allclose(training.alphas_cumprod.double(), truth, rtol=1e-5, atol=1e-9)
    assert torch.equal(training.alphas_cumprod, sampler.alphas_cumprod)
    for key, value in config.items():
        assert sampler.config[key] == value, key
        assert training.config[key] == value, key
    if config.get("rescale_betas_zero_snr"):
        assert float(sampler.alphas_cumprod[-1]) == 0.0
        sampler.set_timesteps(50)
        assert int(sampler.timesteps[0]) == 999  # trailing: the first step is at zero SNR


def test_schedule_errors_name_the_key(tmp_path):
    from mvcustom.configs.train import ModelConfig
    from mvcustom.models import build_model

    with pytest.raises(ValueError, match=r"\['use_karras_sigmas'\] are not DDIMScheduler settings"):
        build_model(ModelConfig(featurenerf_blocks=[], scheduler={"use_karras_sigmas": True}))
    with pytest.raises(ValueError, match="rescale_betas_zero_snr=true needs prediction_type v_prediction"):
        build_model(ModelConfig(featurenerf_blocks=[], scheduler={"rescale_betas_zero_snr": True}))
    with pytest.raises(ValueError, match="model.prediction_type, not model.scheduler"):
        ModelConfig(scheduler={"prediction_type": "v_prediction"})
    # a loaded model keeps its schedule
    model = build_model(ModelConfig(featurenerf_blocks=[], prediction_type="v_prediction"))
    model.save_pretrained(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="model.scheduler.timestep_spacing='trailing' conflicts"):
        build_model(
            ModelConfig(
                featurenerf_blocks=[],
                prediction_type="v_prediction",
                pretrained=str(tmp_path / "m"),
                scheduler={"timestep_spacing": "trailing"},
            )
        )


def test_a_pretrained_folders_schedule_keeps_every_key(tmp_path):
    """SD folders ship PNDM's config; a zero-SNR fine-tune adds keys: all of them reach the model
    (the old loader kept only the keys of SD 1.5's own config)."""
    import json

    from mvcustom.configs.train import ModelConfig
    from mvcustom.models import build_model
    from mvcustom.models.components import save_tiny_pretrained

    sd, adapter = save_tiny_pretrained(str(tmp_path))
    path = tmp_path / "sd15" / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config.update(
        _class_name="PNDMScheduler",
        skip_prk_steps=True,
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        prediction_type="v_prediction",
    )
    path.write_text(json.dumps(config))
    model = build_model(
        ModelConfig(
            size="sd15",
            pretrained=sd,
            motion_adapter=adapter,
            featurenerf_blocks=[],
            prediction_type="v_prediction",
        )
    )
    assert model.scheduler_config["rescale_betas_zero_snr"] is True
    assert model.scheduler_config["timestep_spacing"] == "trailing"
    assert "skip_prk_steps" not in model.scheduler_config
    assert float(build_scheduler(model.scheduler_config).alphas_cumprod[-1]) == 0.0
