"""Config of the training job (``python -m jobs.train``): Ray Train + DeepSpeed ZeRO."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mvcustom.configs.base import check
from mvcustom.configs.common import ClipConfig, MlflowConfig, RayConfig
from mvcustom.configs.model import ArchitectureConfig, LossConfig


@dataclass
class ModelConfig(ArchitectureConfig):
    """Which model is built (``mvcustom.models.build_model``).

    The architecture fields (``camera_encoder``, ``camera_encoder_blocks``,
    ``camera_encoder_heads``, ``featurenerf_blocks``, ``nerf_hidden``, ``nerf_samples``, ``near``,
    ``far``, ``stt_tile``) are :class:`mvcustom.configs.model.ArchitectureConfig`'s, the same
    definition the model library builds from. When a saved model is loaded (``init_from``, or
    ``pretrained`` naming an ``MVCustomModel`` folder), a shape field that differs from the saved
    model's is refused naming the key, and the runtime fields (``nerf_samples``, ``near``,
    ``far``, ``stt_tile``) are applied over the saved ones.

    Attributes:
        size: ``tiny`` (random weights, SD 1.5's layout at tiny widths; tests and the demo) or
            ``sd15`` (SD 1.5 image layers + AnimateDiff motion modules from ``pretrained`` and
            ``motion_adapter``).
        pretrained: ``from_pretrained`` folder or hub id: for ``sd15`` the Stable Diffusion 1.5
            pipeline; for either size, an ``MVCustomModel.save_pretrained`` folder (e.g. the
            stage-1 export) is also accepted and wins over ``size``.
        motion_adapter: ``from_pretrained`` folder or hub id of the AnimateDiff motion adapter
            (``sd15`` only).
        prediction_type: ``epsilon`` (SD 1.5) or ``v_prediction``.
        scheduler: further noise-schedule keys of diffusers' ``DDIMScheduler`` merged over the
            base schedule when the model is built fresh (SD 1.5's for ``tiny``, the
            ``pretrained`` folder's ``scheduler/`` for ``sd15``), e.g. ``{rescale_betas_zero_snr:
            true, timestep_spacing: trailing}`` for a zero-terminal-SNR model (which needs
            ``v_prediction``). Training draws its noise and inference samples from this one
            schedule, saved with the export (``mvcustom.models.schedule``). A loaded model keeps
            its saved schedule: a key here that differs from it is refused. An unknown key is
            refused when the model is built.
        stt_radius_schedule: progressive dense spatio-temporal attention: ``[[step, radius], ...]``
            (radius in latent pixels of each motion module's map; -1 = full feature map); the
            radius in force at a step is the last entry whose step is <= it.
        stage2_stt_radius: the constant STT radius of stage 2 (customization trains the
            expanded model at the radius inference uses, PAPER.md §3). ``null``: the final radius
            the stage-1 export recorded (``mvcustom_training.json``), else the last radius of
            ``stt_radius_schedule``. Stage 1 follows ``stt_radius_schedule``.
    """

    size: Literal["tiny", "sd15"] = "tiny"
    pretrained: str | None = None
    motion_adapter: str | None = None
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    scheduler: dict = field(default_factory=dict)
    stt_radius_schedule: list[tuple[int, int]] = field(
        default_factory=lambda: [(0, 0), (1000, 1), (3000, 2), (6000, -1)]
    )
    stage2_stt_radius: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        steps = [s for s, _ in self.stt_radius_schedule]
        check(
            steps == sorted(steps) and steps and steps[0] == 0,
            "model.stt_radius_schedule must start at step 0 and be sorted by step",
        )
        check(
            all(r >= -1 for _, r in self.stt_radius_schedule),
            "model.stt_radius_schedule radii must be >= 0 or -1 (full)",
        )
        check(
            self.stage2_stt_radius is None or self.stage2_stt_radius >= -1,
            "model.stage2_stt_radius must be >= 0 or -1 (full), or null",
        )
        check(
            "prediction_type" not in self.scheduler,
            "set the prediction type with model.prediction_type, not model.scheduler.prediction_type",
        )
        check(
            self.size == "tiny" or self.pretrained is not None,
            "model.pretrained is required unless model.size is tiny",
        )


@dataclass
class OptimConfig:
    """AdamW with warmup then a constant or cosine schedule.

    Attributes:
        lr: peak learning rate. weight_decay: AdamW decay. warmup_steps: linear warmup.
        schedule: ``constant`` or ``cosine`` (to 0 at ``max_steps``).
        grad_accum: micro-batches per optimizer step. grad_clip: max gradient norm (0: off).
    """

    lr: float = 1e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 100
    schedule: Literal["constant", "cosine"] = "constant"
    grad_accum: int = 1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        check(self.lr > 0, "optim.lr must be positive")
        check(
            self.grad_accum >= 1 and self.warmup_steps >= 0 and self.grad_clip >= 0,
            "optim: grad_accum >= 1, warmup_steps >= 0, grad_clip >= 0",
        )


@dataclass
class DeepSpeedConfig:
    """DeepSpeed settings derived into its JSON config (one source of truth).

    Attributes:
        zero_stage: ZeRO stage 0-3. offload_optimizer: ZeRO-Offload of optimizer state to CPU.
        precision: ``auto`` (bf16 on GPU, fp32 on CPU), ``bf16`` or ``fp32``.
        stage3_max_reuse_distance: ZeRO-3 keeps a gathered parameter if it is reused within this
            many parameters (``None``: DeepSpeed's default, 1e9). After every module, DeepSpeed
            scans the trace ahead until that many parameters are passed; a model smaller than
            the distance is scanned to the end each time, quadratic in its module calls. The
            tiny debug model (many small modules) took 60 s for one step that way, 5 s with 0.
        config_file: a DeepSpeed JSON file (local path or fsspec URL, e.g. one of
            ``infra/deepspeed/*.json``) merged over the derived JSON and under ``raw_override``:
            the tuning knobs (bucket sizes, overlap, ``stage3_*``, offload pinning). Keys this
            config owns (``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``,
            ``gradient_clipping``, ``zero_optimization.stage``, ``bf16.enabled``, ``fp16.enabled``,
            ``zero_optimization.offload_optimizer.device``, and ``stage3_max_reuse_distance``
            when set here at stage 3) must be absent from the file, ``"auto"`` (filled in from
            this config, as in HF Trainer) or equal to this config's value; anything else is a
            ``ValueError`` naming the ``--set`` key to change instead. A local path is read
            where the engine is built (under Ray Train: the worker, in its own directory), so
            give an absolute path or a URL there.
        raw_override: keys merged last into the generated DeepSpeed JSON (escape hatch).
    """

    zero_stage: int = 2
    offload_optimizer: bool = False
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    stage3_max_reuse_distance: int | None = None
    config_file: str | None = None
    raw_override: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check(self.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage must be 0-3, got {self.zero_stage}")


@dataclass
class ScalingConfig:
    """Ray Train workers.

    Attributes:
        num_workers: ranks.
        use_gpu: each worker takes ``gpus_per_worker`` GPUs (NCCL); otherwise CPU and gloo.
        cpus_per_worker, gpus_per_worker: resources each worker reserves.
        placement_strategy: how the workers' placement group is laid out over nodes (Ray's
            ``PACK`` fills a node first: fewest cross-node collectives; ``SPREAD`` puts workers
            on different nodes where it can; ``STRICT_*`` refuse to start otherwise).
    """

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    def __post_init__(self) -> None:
        check(self.num_workers >= 1, "scaling.num_workers must be >= 1")


@dataclass
class TrainDataConfig:
    """How training examples are drawn from the shards (``mvcustom.training.data``).

    Attributes:
        shuffle_buffer: per-rank sample shuffle buffer.
        num_references: stage 2: reference views taken from each clip besides its target
            frames (CD360 uses 5).
        prompt_template: stage 1 prompt; ``{caption}``, ``{category}``, ``{token}`` are filled in.
        prompt_template_customize: stage 2 prompt (the subject token with its class word).
        frame_selection: which frames of a clip make a stage-1 example. ``window``: evenly
            spread over a random window of the clip, in clip order (video). ``anchored_random``:
            the clip's first frame, then the other frames drawn at random in random order: the
            later frames are no longer a fixed temporal pattern, so only their cameras say which
            view each is (a multi-view objective), while the first frame fixes the world the
            cameras are expressed in (the camera encoder sees poses relative to it).
        caption_dropout: probability that a training example's prompt is replaced by the empty
            prompt (both stages), so the unconditional branch that classifier-free guidance
            samples with at inference (the empty negative prompt, and the FeatureNeRF under it)
            is trained too. SD and AnimateDiff train with 0.1. Drawn from the seeded example
            stream, so a resumed run drops the same captions.
        subject_init_word: stage 2: the word whose embedding initialises the subject token
            (``null``: random).
        min_rotation_deg: drop clips whose preprocessing-recorded camera rotation is smaller
            (static shots; 0 keeps everything, clips without the figure are kept).
        subject: stage 2: the one subject to learn, as ``category/sequence`` (CO3D),
            ``photos/<folder>`` or the bare sequence/folder name; samples of other subjects in
            the shards are skipped. ``null``: the shards must hold exactly one subject.
        multiple_subjects: stage 2: allow shards with several subjects (one token learns them
            all; not the paper's setting). Without it such a run is refused, listing them.
        max_bad_samples: samples (or unreadable shard tails) a rank may skip because they are
            corrupt before the run fails; each skip is printed and counted (MLflow
            ``data_bad_samples``). 0: fail on the first. A storage timeout is never skipped:
            it fails the step and Ray Train restarts from the last checkpoint.
    """

    shuffle_buffer: int = 64
    num_references: int = 5
    prompt_template: str = "{caption}"
    prompt_template_customize: str = "a photo of {token} {category}"
    frame_selection: Literal["window", "anchored_random"] = "window"
    caption_dropout: float = 0.1
    subject_init_word: str | None = None
    min_rotation_deg: float = 0.0
    subject: str | None = None
    multiple_subjects: bool = False
    max_bad_samples: int = 16

    def __post_init__(self) -> None:
        check(self.shuffle_buffer >= 1, "data.shuffle_buffer must be >= 1")
        check(self.max_bad_samples >= 0, "data.max_bad_samples must be >= 0")
        check(self.num_references >= 1, "data.num_references must be >= 1")
        check(self.min_rotation_deg >= 0, "data.min_rotation_deg must be >= 0")
        check(0 <= self.caption_dropout < 1, "data.caption_dropout must be in [0, 1)")


@dataclass
class TrainConfig:
    """A training run.

    Attributes:
        stage: ``backbone`` (stage 1: motion/STT + camera encoder on video clips) or ``customize``
            (stage 2: FeatureNeRF + token + injection layers on one subject).
        shards: shard URLs or globs (fsspec).
        output: run folder for checkpoints and the exported model.
        init_from: a ``from_pretrained`` folder to start from (stage 2: the stage-1 export).
        subject_token: the textual-inversion token (stage 2).
        batch_size: clips per rank per micro-batch. max_steps: optimizer steps.
        checkpoint_every: steps between checkpoints. sample_every: steps between sample grids.
        sample_steps: DDIM steps of those samples.
        seed: global seed (ranks derive theirs from it).
        max_failures: worker-group restarts from the latest checkpoint before the job fails
            (Ray Train ``FailureConfig``; -1: unlimited).
        keep_checkpoints: checkpoints kept in storage (the newest ones).
        progress_every_s: rank 0 prints a progress line (step, loss, steps/s, ETA) at the first
            and the last step and at most this often in between (the same figures go to MLflow
            every step).
        resume_allow: config keys that may differ from the checkpoint's when a resubmitted job
            resumes (``RESUME_KEYS``: world size, batch size, accumulation, shards, max_steps,
            seed, stage, subject token); any other difference is refused, naming the key.
        model: the architecture and where its weights come from (:class:`ModelConfig`).
        loss: the loss terms' weights (:class:`mvcustom.configs.model.LossConfig`).
    """

    # keys whose change between a checkpoint and its resumption would silently change the run:
    # the data stream is fast-forwarded by (step x accumulation x batch) per rank and world size
    RESUME_KEYS = (
        "scaling.num_workers",
        "batch_size",
        "optim.grad_accum",
        "shards",
        "max_steps",
        "seed",
        "stage",
        "subject_token",
    )

    PRESETS = ("debug", "paper")

    stage: Literal["backbone", "customize"] = "backbone"
    shards: list[str] = field(default_factory=list)
    output: str = ""
    init_from: str | None = None
    subject_token: str = "<sks>"
    batch_size: int = 1
    max_steps: int = 1000
    checkpoint_every: int = 200
    sample_every: int = 500
    sample_steps: int = 25
    seed: int = 0
    max_failures: int = 2
    keep_checkpoints: int = 3
    progress_every_s: float = 30.0
    resume_allow: list[str] = field(default_factory=list)
    clip: ClipConfig = field(default_factory=ClipConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=lambda: MlflowConfig(experiment="mvcustom-train"))

    def __post_init__(self) -> None:
        check(self.batch_size >= 1 and self.max_steps >= 1, "batch_size and max_steps must be >= 1")
        check(
            self.checkpoint_every >= 1 and self.sample_every >= 1,
            "checkpoint_every and sample_every must be >= 1",
        )
        check(
            self.stage == "backbone" or self.init_from is not None or self.model.size == "tiny",
            "stage customize needs init_from (the stage-1 export) unless the model is tiny",
        )
        check(self.sample_steps >= 1, "sample_steps must be >= 1")
        check(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
        check(self.progress_every_s > 0, "progress_every_s must be positive")
        bad = [k for k in self.resume_allow if k not in self.RESUME_KEYS]
        check(not bad, f"resume_allow: {bad} are not resume keys; choose from {list(self.RESUME_KEYS)}")
        check(
            self.stage == "backbone" or self.model.featurenerf_blocks or self.subject_token,
            "stage customize needs model.featurenerf_blocks or a subject_token",
        )

    @classmethod
    def paper(cls) -> TrainConfig:
        """The paper's configuration: camera control only through FeatureNeRF (no Plücker encoder)."""
        return cls(model=ModelConfig(camera_encoder=False))

    @classmethod
    def debug(cls) -> TrainConfig:
        return cls(
            max_steps=4,
            checkpoint_every=2,
            sample_every=4,
            sample_steps=2,
            clip=ClipConfig(num_frames=4, height=64, width=64),
            model=ModelConfig(stt_radius_schedule=[(0, 0), (2, -1)]),
            data=TrainDataConfig(shuffle_buffer=4, num_references=2),
            optim=OptimConfig(warmup_steps=1),
            deepspeed=DeepSpeedConfig(stage3_max_reuse_distance=0),
        )
