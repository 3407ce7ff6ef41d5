"""The prepared GPU check: what this project has only projected or tested on CPU, measured on a GPU.

    make gpu-check                                        # a CUDA machine: real sizes (JSON in .tmp/gpu_check)
    python benchmarks/gpu_check.py --out DIR              # the same
    python benchmarks/gpu_check.py --dry-run --out DIR    # CPU, tiny sizes, seconds (run by make test)

One JSON of figures, ``<out>/gpu_check.json`` (also printed). Random weights at the real
architectures, built from configs (no download): the figures are costs (time, memory) and
numerical agreement, not image quality. Sections, each recorded even when another fails (the
script then exits 1 naming the failed ones):

1. ``train``: stage 1's training step at SD 1.5 size (UNet 320-1280 + AnimateDiff motion modules,
   camera encoder, FeatureNeRF blocks, CLIP-L text encoder, SD VAE), 16 frames 256x384, through
   the project's own engine (``TrainStep`` + ``build_engine``: DeepSpeed ZeRO-2, bf16, one GPU):
   clips/s, peak GPU memory, losses (finite?).
2. ``sample``: ``MVCustomPipeline`` at SD size, 16 frames 256x384, 5 reference views, DDIM 50
   steps with feature rendering (35 steps) and latent completion (10), guidance 7.5: seconds and
   peak memory per sample, without and with ``enable_model_cpu_offload``. The anchor depth is a
   constant here (ZoeDepth's cost is section 3). The paper: 131 s and 19.3 GB per sample.
3. ``zoedepth``: ZoeDepth at ``Intel/zoedepth-nyu-kitti``'s architecture (345M parameters) at the
   preprocessing config's input size and batch, fp32 and bf16: frames/s, and how far bf16 depth
   is from fp32 (relative error per pixel).
4. ``oracle``: the sampler test of ``tests/test_sampling.py`` on the device in the model's dtype
   (bf16 on CUDA): an oracle denoiser through ``MVCustomPipeline`` at SD's latent size, for SD's
   epsilon schedule, v-prediction and zero terminal SNR with trailing spacing (CPU fp32: 3.0 %).
5. ``dreamsim``: the evaluation's DreamSim path (the ``dreamsim`` package over the image's CUDA
   torchvision, through ``DreamSimEncoder``) with random weights at the ensemble's architecture
   written as the package's checkpoint folder (:func:`write_random_dreamsim`), on generated
   frames: images/s, embeddings finite, distances. The dry-run reports it skipped, saying why,
   where the package cannot be imported (the CPU lock has no torchvision).

The device tool's machines have no Ray, DeepSpeed or diffusers: ``make gpu-wheels`` downloads the
wheels the check needs for Python 3.12 into ``.whl/`` (see the README's GPU check section).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SIZES = {
    # the paper's setting (AnimateDiff / CameraCtrl: 16 frames at 256x384)
    "full": {
        "frames": 16,
        "hw": (256, 384),
        "train_steps": 4,
        "steps": 50,
        "render": 35,
        "complete": 10,
        "refs": 5,
    },
    "dry": {"frames": 4, "hw": (32, 32), "train_steps": 2, "steps": 3, "render": 2, "complete": 1, "refs": 2},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _components(dry: bool):
    from mvcustom.models.components import sd15_architecture_components, tiny_components

    return tiny_components(seed=0) if dry else sd15_architecture_components(seed=0)


def check_train(device: torch.device, dry: bool, out: str) -> dict:
    """Section 1 (see the module docstring)."""
    from mvcustom.configs import TrainConfig, from_dict
    from mvcustom.geometry.trajectories import orbit
    from mvcustom.models import MVCustomConfig, MVCustomModel
    from mvcustom.models.objective import set_trainable
    from mvcustom.models.schedule import build_scheduler
    from mvcustom.training.context import LocalContext
    from mvcustom.training.engine import TrainStep, build_engine
    from mvcustom.training.loop import init_distributed

    size = SIZES["dry" if dry else "full"]
    H, W = size["hw"]
    Fr = size["frames"]
    precision = "bf16" if device.type == "cuda" else "fp32"
    cfg = from_dict(
        TrainConfig,
        {
            "max_steps": size["train_steps"],
            "batch_size": 1,
            "clip": {"num_frames": Fr, "height": H, "width": W},
            "optim": {"warmup_steps": 0},
            "deepspeed": {"zero_stage": 2, "precision": precision},
            "scaling": {"use_gpu": device.type == "cuda"},
            "mlflow": {"enabled": False},
        },
        "gpu check",
    )
    init_distributed(LocalContext(out, use_gpu=device.type == "cuda"))
    torch.manual_seed(0)
    model = MVCustomModel(_components(dry), MVCustomConfig())
    params = set_trainable(model, "backbone")
    engine = build_engine(
        TrainStep(model, "backbone", build_scheduler(model.scheduler_config)), params, cfg, device
    )
    cams = orbit(Fr, radius=2.0, span_deg=60, image_hw=(H, W))
    g = torch.Generator().manual_seed(0)
    batch = {
        "frames": (torch.rand(1, Fr, 3, H, W, generator=g) * 2 - 1).to(device),
        "caption": ["a photo of a teddybear on a table"],
        "extrinsics": cams.w2c.float().unsqueeze(0).to(device),
        "intrinsics": cams.K.float().unsqueeze(0).to(device),
    }
    losses, seconds = [], []
    _reset_peak(device)
    for step in range(size["train_steps"]):
        _sync(device)
        t = time.perf_counter()
        loss, _ = engine(batch, -1, torch.Generator(device=device).manual_seed(step))
        engine.backward(loss)
        engine.step()
        _sync(device)
        seconds.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    timed = seconds[1:] or seconds  # the first step pays kernel selection and allocation
    return {
        "what": "stage-1 step (motion modules + camera encoder trained), STT radius -1 (dense), ZeRO-2",
        "precision": precision,
        "frames": Fr,
        "hw": [H, W],
        "parameters_total_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "parameters_trained_m": round(sum(p.numel() for p in params.values()) / 1e6, 1),
        "step_seconds": [round(s, 4) for s in seconds],
        "clips_per_s": round(1 / (sum(timed) / len(timed)), 4),
        "peak_memory_gib": _peak_gib(device),
        "losses": losses,
        "loss_finite": all(np.isfinite(losses)),
    }


def check_sample(device: torch.device, dry: bool) -> dict:
    """Section 2 (see the module docstring)."""
    from mvcustom.geometry.trajectories import orbit
    from mvcustom.inference.pipeline import InferenceOptions, MVCustomPipeline, ReferenceViews
    from mvcustom.models import MVCustomConfig, MVCustomModel

    size = SIZES["dry" if dry else "full"]
    H, W = size["hw"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = MVCustomModel(_components(dry), MVCustomConfig()).to(device, dtype)
    pipe = MVCustomPipeline(model, depth_estimator=lambda x: np.full(x.shape[:3], 2.0, np.float32))
    pipe.set_progress_bar_config(disable=True)
    cams = orbit(size["frames"], radius=2.0, span_deg=60, image_hw=(H, W))
    rng = np.random.default_rng(0)
    refs = ReferenceViews(
        rng.integers(0, 255, (size["refs"], H, W, 3), dtype=np.uint8),
        orbit(size["refs"], radius=2.0, span_deg=120, start_azimuth_deg=90, image_hw=(H, W)),
        np.ones((size["refs"], H, W), bool),
    )
    opts = InferenceOptions(feature_rendering_steps=size["render"], completion_until_step=size["complete"])

    def one(p, steps: int) -> tuple[float, float | None]:
        _reset_peak(device)
        _sync(device)
        t = time.perf_counter()
        p(
            "a photo of a teddybear on a beach",
            cams,
            refs,
            num_inference_steps=steps,
            options=opts,
            output_type="np",
        )
        _sync(device)
        return time.perf_counter() - t, _peak_gib(device)

    one(pipe, 2)  # warm-up: kernel selection, allocator
    seconds, peak = one(pipe, size["steps"])
    result = {
        "dtype": str(dtype).removeprefix("torch."),
        "frames": size["frames"],
        "hw": [H, W],
        "steps": size["steps"],
        "reference_views": size["refs"],
        "seconds_per_sample": round(seconds, 3),
        "peak_memory_gib": peak,
        "paper": {"seconds_per_sample": 130.92, "peak_memory_gb": 19.29},
    }
    offloaded = copy.deepcopy(pipe) if device.type == "cpu" else pipe
    offloaded.enable_model_cpu_offload(device=device)
    one(offloaded, 2)
    seconds, peak = one(offloaded, size["steps"])
    result["cpu_offload"] = {"seconds_per_sample": round(seconds, 3), "peak_memory_gib": peak}
    return result


def check_zoedepth(device: torch.device, dry: bool) -> dict:
    """Section 3 (see the module docstring)."""
    from transformers import ZoeDepthForDepthEstimation

    from mvcustom.configs.preprocess import DepthModelConfig
    from mvcustom.models.zoedepth import DepthEstimator, nyu_kitti_zoedepth_config, tiny_zoedepth_config

    depth_cfg = DepthModelConfig()
    input_size = (64, 64) if dry else tuple(depth_cfg.input_size)
    frames_hw = (64, 64) if dry else (256, 256)  # the stored clip size of the preprocessing defaults
    n = 4 if dry else 64
    torch.manual_seed(0)
    net = ZoeDepthForDepthEstimation(tiny_zoedepth_config() if dry else nyu_kitti_zoedepth_config()).eval()
    frames = np.random.default_rng(0).integers(0, 255, (n, *frames_hw, 3), dtype=np.uint8)
    out: dict = {
        "parameters_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 1),
        "input_size": list(input_size),
        "frames_hw": list(frames_hw),
        "batch_size": depth_cfg.batch_size,
        "flip_average": depth_cfg.flip_average,
    }
    depths = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        est = DepthEstimator(
            copy.deepcopy(net),
            device=str(device),
            input_size=input_size,
            flip_average=depth_cfg.flip_average,
            batch_size=depth_cfg.batch_size,
            dtype=dtype,
        )
        est(frames[: depth_cfg.batch_size])  # warm-up
        _sync(device)
        t = time.perf_counter()
        depths[name] = est(frames)
        _sync(device)
        out[f"{name}_frames_per_s"] = round(n / (time.perf_counter() - t), 2)
        del est
    rel = np.abs(depths["bf16"] - depths["fp32"]) / np.maximum(np.abs(depths["fp32"]), 1e-6)
    out["bf16_vs_fp32_relative_error"] = {
        "median": float(np.median(rel)),
        "p99": float(np.quantile(rel, 0.99)),
        "max": float(rel.max()),
    }
    return out


def check_oracle(device: torch.device, dry: bool) -> dict:
    """Section 4 (see the module docstring)."""
    from mvcustom.geometry.trajectories import orbit
    from mvcustom.inference.oracle import ORACLE_SCHEDULES, OracleDenoiser
    from mvcustom.inference.pipeline import InferenceOptions, MVCustomPipeline
    from mvcustom.models import MVCustomConfig, MVCustomModel

    schedules = ORACLE_SCHEDULES
    size = SIZES["dry" if dry else "full"]
    H, W = size["hw"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = MVCustomModel.tiny(MVCustomConfig(featurenerf_blocks=[]), seed=0).to(device, dtype)
    cams = orbit(size["frames"], radius=2.0, span_deg=60, image_hw=(H, W))
    x0 = torch.randn(1, size["frames"], 4, H // 8, W // 8, generator=torch.Generator().manual_seed(0))
    out: dict = {"dtype": str(dtype).removeprefix("torch."), "steps": 50, "latent_shape": list(x0.shape)}
    for name, config in schedules.items():
        model.scheduler_config = dict(config)
        pipe = MVCustomPipeline(model)
        pipe.set_progress_bar_config(disable=True)
        model.forward = OracleDenoiser(x0, cams.w2c, config)
        latents = pipe(
            "a chair",
            cams,
            num_inference_steps=50,
            generator=torch.Generator(device=device).manual_seed(1),
            options=InferenceOptions(feature_rendering=False),
            output_type="latent",
        ).frames
        out[f"{name}_relative_error"] = float((latents.float().cpu() - x0).norm() / x0.norm())
    return out


def write_random_dreamsim(folder: str, seed: int = 0) -> None:
    """A DreamSim ``cache_dir`` holding random weights at the ensemble's architecture, laid out as
    the package's downloaded checkpoints are, so ``dreamsim(pretrained=True, cache_dir=folder)``
    (the path :class:`mvcustom.metrics.features.DreamSimEncoder` takes) runs offline:

    * DINO ViT-B/16, which the package gets through ``torch.hub.load('facebookresearch/dino:main')``
      with the hub directory set to ``folder``: a cached hub repo whose ``hubconf`` builds the
      package's own copy of DINO's ViT-B/16 (random), marked trusted; and its projection head
      (``dino_vitb16_pretrain.pth``);
    * CLIP and OpenCLIP ViT-B/16 converted to that ViT, with their projections
      (``{clip,open_clip}_vitb16_pretrain.pth.tar``);
    * the LoRA adapters over all three (``ensemble_lora/``: PEFT's own ``save_pretrained`` of the
      package's ``PerceptualModel`` with its LoRA config, B initialised random instead of zero so
      the adapters change the output as trained ones do).
    """
    from dreamsim.feature_extraction.vision_transformer import DINOHead, vit_base

    torch.manual_seed(seed)
    root = Path(folder)
    repo = root / "facebookresearch_dino_main"
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "hubconf.py").write_text(
        "dependencies = ['torch']\n\n\n"
        "def dino_vitb16(pretrained=True, **kwargs):\n"
        "    from dreamsim.feature_extraction.vision_transformer import vit_base\n\n"
        "    return vit_base(patch_size=16, num_classes=0, **kwargs)\n"
    )
    (root / "trusted_list").write_text("facebookresearch_dino\n")
    head = DINOHead(768, 2048)
    student = {f"module.head.{k}": v for k, v in head.state_dict().items()}
    student["module.head.last_layer.weight"] = torch.randn(65536, 256) / 16
    torch.save({"student": student}, root / "dino_vitb16_pretrain.pth")
    for name in ("clip_vitb16", "open_clip_vitb16"):
        vit = vit_base(patch_size=16)
        vit.pos_drop = torch.nn.LayerNorm(vit.embed_dim)
        state = dict(vit.state_dict())
        state["proj"] = torch.randn(768, 512) / 768**0.5
        torch.save({"state_dict": state}, root / f"{name}_pretrain.pth.tar")

    from dreamsim.model import PerceptualModel, dreamsim_args
    from peft import LoraConfig, get_peft_model

    model = PerceptualModel(**dreamsim_args["model_config"]["ensemble"], device="cpu", load_dir=folder)
    lora = LoraConfig(r=16, lora_alpha=0.5, lora_dropout=0.3, bias="none", target_modules=["qkv"])
    peft = get_peft_model(model, lora)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    peft.save_pretrained(str(root / "ensemble_lora"))


def check_dreamsim(device: torch.device, dry: bool, scratch: str) -> dict:
    """Section 5: the DreamSim path the evaluation scores consistency and identity with (the
    ``dreamsim`` package over the image's CUDA torchvision, through
    :class:`mvcustom.metrics.features.DreamSimEncoder`), random weights at the ensemble's
    architecture (:func:`write_random_dreamsim`), on two frames rendered by the generator."""
    from mvcustom.data.generator.scene import render
    from mvcustom.data.generator.subjects import make_scene, make_subject, subject_extent
    from mvcustom.geometry.trajectories import orbit
    from mvcustom.metrics.features import DreamSimEncoder
    from mvcustom.metrics.similarity import multiview_consistency

    folder = str(Path(scratch) / "dreamsim")
    write_random_dreamsim(folder)
    encoder = DreamSimEncoder.from_pretrained(folder, device=device)
    centre, radius = subject_extent(make_subject("chair", 5))
    cams = orbit(3, radius=3 * radius, span_deg=40, target=tuple(centre.tolist()), image_hw=(224, 224))
    frames = render(make_scene("chair", 5, 6), cams).rgb.numpy()  # (3, 224, 224, 3) uint8
    n = 8 if dry else 64
    batch = np.concatenate([frames] * (n // len(frames) + 1))[:n]
    encoder.encode_images(batch[:2])  # warm-up
    _sync(device)
    t = time.perf_counter()
    embeddings = encoder.encode_images(batch)
    _sync(device)
    seconds = time.perf_counter() - t
    same = float(multiview_consistency(embeddings[:1].repeat(2, 1)))
    return {
        "label": encoder.label,
        "embedding_dim": int(embeddings.shape[1]),
        "images_per_s": round(n / seconds, 2),
        "distance_adjacent_views": float(multiview_consistency(embeddings[:3])),
        "distance_identical_images": same,
        "embeddings_finite": bool(torch.isfinite(embeddings).all()),
    }


def dreamsim_unavailable() -> str | None:
    """Why the ``dreamsim`` package cannot be imported here, or ``None``."""
    try:
        import dreamsim  # noqa: F401
    except Exception as e:  # ImportError, or torchvision failing to load its operators
        return f"the dreamsim package is not importable here ({type(e).__name__}: {e})"
    return None


def environment(device: torch.device) -> dict:
    import importlib.metadata as md

    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    for pkg in ("diffusers", "transformers", "deepspeed", "accelerate"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    return env


CHECKS = ("train", "sample", "zoedepth", "oracle", "dreamsim")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / ".tmp" / "gpu_check"))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (what make test runs)")
    ap.add_argument("--only", nargs="*", choices=CHECKS, default=list(CHECKS))
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device: the real check needs a GPU (use --dry-run for the CPU rehearsal)")
    device = torch.device("cpu" if args.dry_run else "cuda")
    os.makedirs(args.out, exist_ok=True)
    report: dict = {"dry_run": args.dry_run, "environment": environment(device), "failed": []}
    with tempfile.TemporaryDirectory(dir=args.out) as scratch:
        # JIT-built DeepSpeed ops go to scratch unless the caller says where (not into the output)
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(scratch) / "torch_extensions"))
        for name in args.only:
            t = time.perf_counter()
            try:
                if name == "train":
                    report[name] = check_train(device, args.dry_run, scratch)
                elif name == "sample":
                    report[name] = check_sample(device, args.dry_run)
                elif name == "zoedepth":
                    report[name] = check_zoedepth(device, args.dry_run)
                elif name == "oracle":
                    report[name] = check_oracle(device, args.dry_run)
                elif args.dry_run and (why := dreamsim_unavailable()):
                    # the CPU lock cannot hold torchvision, so neither dreamsim: the rehearsal says
                    # so; on a GPU a missing package fails the section like any other error
                    report[name] = {"skipped": why}
                else:
                    report[name] = check_dreamsim(device, args.dry_run, scratch)
            except Exception as e:  # one check's failure is recorded; the others still run
                report[name] = {
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc()[-4000:],
                }
                report["failed"].append(name)
            report[name]["wall_seconds"] = round(time.perf_counter() - t, 2)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"[gpu_check] {name}: {report[name]['wall_seconds']} s", file=sys.stderr, flush=True)
    text = json.dumps(report, indent=2, default=str)
    Path(args.out, "gpu_check.json").write_text(text)
    print(text)
    if report["failed"]:
        print(f"[gpu_check] FAILED: {', '.join(report['failed'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
