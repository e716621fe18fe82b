r"""FGTBT configurations.

  python scripts/train.py --config configs/fgtbt.py:tiny --workdir /tmp/fgtbt_tiny

Presets (``--config configs/fgtbt.py:<preset>``):
  release         the published recipe (SPEC §2, §6): mit_b4_evp, 480² crops, 240² heatmaps,
                  1 image per dataset per step, 100 000 steps, AdamW 2.5e-4, ×0.8 milestones, EMA.
  reference_tiny  exactly the tiny architecture of ../shared/reference/tiny_checkpoint.pth (96²).
  tiny            reference_tiny sizes with a CPU training recipe that runs in seconds per step.
  b0|b1|b2|b3|b5  the other MiT widths / depths at the release recipe.

Every field can be overridden on the command line, e.g. ``--config.optim.lr=1e-4``.
"""

from __future__ import annotations

import ml_collections

_MIT = {
    # name: (embed_dims, num_heads, depths)
    "b0": ((32, 64, 160, 256), (1, 2, 5, 8), (2, 2, 2, 2)),
    "b1": ((64, 128, 320, 512), (1, 2, 5, 8), (2, 2, 2, 2)),
    "b2": ((64, 128, 320, 512), (1, 2, 5, 8), (3, 4, 6, 3)),
    "b3": ((64, 128, 320, 512), (1, 2, 5, 8), (3, 4, 18, 3)),
    # The release's "mit_b4_evp": B4 widths with depths [3, 6, 18, 3] (SPEC §2.1).
    "b4": ((64, 128, 320, 512), (1, 2, 5, 8), (3, 6, 18, 3)),
    "b5": ((64, 128, 320, 512), (1, 2, 5, 8), (3, 6, 40, 3)),
}


def model_config(variant: str = "b4") -> ml_collections.ConfigDict:
    """Architecture of the network (SPEC §2); ``variant`` is a MiT size or ``reference_tiny``."""
    m = ml_collections.ConfigDict()
    if variant == "reference_tiny":
        dims, heads, depths, decoder_dim = (16, 32, 64, 128), (1, 2, 4, 8), (2, 1, 2, 1), 64
    else:
        dims, heads, depths = _MIT[variant]
        decoder_dim = 768 if variant != "b0" else 256
    m.embed_dims = dims
    m.num_heads = heads
    m.depths = depths
    m.sr_ratios = (8, 4, 2, 1)
    m.mlp_ratio = 4
    m.decoder_dim = decoder_dim
    m.num_landmarks = 124
    m.drop_path_rate = 0.1  # stochastic depth, linear over all blocks
    m.decoder_dropout = 0.1  # Dropout2d before linear_pred
    m.hpf_sigma = 20.0  # Gaussian high-pass radius of the FFT prompt (SPEC §2.1)
    # High-pass prompt: "fft" (jnp.fft) or "dft" (the same operator as real matmuls, for ONNX).
    m.fft = "fft"
    m.prompt_scale_factor = 4  # prompt widths are E/4
    # CSAM statistics: "batch" reduces over (batch, A, A) as the reference does (a sample's
    # output depends on its batch); "sample" reduces over (A, A) only.
    m.csam_reduction = "batch"
    # Compute dtype: "float32", "bfloat16" (parameters, statistics, FFT and loss stay float32) or
    # "float64" (everything float64, for numerical debugging; the scripts enable jax_enable_x64).
    m.dtype = "float32"
    # Rematerialize each transformer block in the backward pass (saves memory).
    m.remat = False
    # Op implementations (fgtbt_jax/ops): "xla" = the SPEC's layers on standard lax ops (GPU/TPU),
    # "cpu" = XLA:CPU fast paths (same parameters), "auto" = "cpu" on a CPU backend, else "xla".
    m.kernels = "auto"
    # Decoder formulation (same parameters, same results up to rounding): "paper" = SPEC §2.2's
    # layer order; "fused" = linear_c{s}∘linear_fuse at each stage's resolution and
    # upSample∘conv2 as one 3×3 convolution (fewer FLOPs and bytes; fgtbt_jax/models/
    # fused_decoder.py), with either kernels; "auto" = "fused".
    m.decoder_form = "auto"
    # Stem formulation (same parameters, same results up to rounding): "paper" = BN → ReLU → 1×1
    # → BN → ReLU → 7×7/4 on the full-resolution map; "blocks" = the same on 4×4 space-to-depth
    # blocks (fgtbt_jax/models/backbone.py OverlapPatchEmbed); "auto" = "blocks" with xla
    # kernels, "paper" with cpu kernels.
    m.stem_form = "auto"
    return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "release"
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.seed = 0

    if preset in ("reference_tiny", "tiny"):
        c.model = model_config("reference_tiny")
        c.img_size = 96
    elif preset == "release" or preset in _MIT:
        c.model = model_config("b4" if preset == "release" else preset)
        c.img_size = 480
    else:
        raise ValueError(
            f"unknown preset {preset!r}; choose release, reference_tiny, tiny or b0-b5"
        )
    c.heatmap_size = c.img_size // 2

    # Data (SPEC §4; read by input_pipeline/sources.py). source "demo" = the bundled synthetic
    # set (prepared on first use); "official" = TFDS datasets prepared from the official files
    # with scripts/prepare_data.py; "synthetic" = in-memory generated batches
    # (input_pipeline/synthetic.py; no files, no TF).
    c.data = ml_collections.ConfigDict()
    c.data.source = "demo"
    c.data.data_dir = "data/tfds"  # TFDS data_dir (relative to the working directory) or gs://
    # Local copy of a gs:// data_dir (docs/storage.md); "" = ~/.cache/fgtbt_jax/tfds/<bucket>/<path>
    c.data.stage_dir = ""
    c.data.manual_dir = ""  # official files, for on-the-fly preparation
    c.data.datasets = ("COFW", "WFLW", "300W", "AFLW")
    # Scheme files (docs/schemes.md) of the datasets of data.datasets that are not built-in;
    # model.num_landmarks follows their unified set (fgtbt_jax.schemes.configure).
    c.data.schemes = ()
    c.data.batch_per_dataset = 1  # every global batch holds this many samples of each dataset
    c.data.sampling = "balanced"  # or "weighted": data.weights, one entry per dataset
    c.data.weights = (0.25, 0.25, 0.25, 0.25)
    c.data.scale_range = (0.75, 1.25)
    c.data.rotation_deg = 30.0
    c.data.rotation_prob = 0.6
    c.data.flip_prob = 0.5
    c.data.shuffle_buffer = 1000
    c.data.prefetch = 2
    c.data.demo_num_images = 64  # per dataset, for the bundled synthetic set
    c.data.demo_image_size = ()  # (width, height) of every demo photo; () = random 160–256 px
    c.data.demo_seed = 0
    c.data.num_parallel_calls = -1  # tf.data map parallelism (≤ 0: AUTOTUNE)
    c.data.threads = 0  # tf.data private thread pool size (0: the shared pool)
    c.data.cv2_threads = 1  # OpenCV threads inside tf.data (which already runs a sample per core)
    c.data.synthetic_eval_images = 16  # per dataset, evaluation set of source "synthetic"

    # Loss (SPEC §3).
    c.loss = ml_collections.ConfigDict()
    c.loss.omega = 14.0
    c.loss.theta = 0.5
    c.loss.epsilon = 1.0
    c.loss.alpha = 2.1
    c.loss.beta = 0.9
    c.loss.sigma = 3.0
    c.loss.weight_map_threshold = 0.2
    c.loss.weight_map_scale = 10.0

    # Optimizer (SPEC §6): AdamW with PyTorch defaults, ×gamma at each milestone.
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2.5e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.01
    c.optim.milestones = (40_000, 70_000, 90_000, 100_000)
    c.optim.gamma = 0.8
    c.optim.warmup_steps = 0
    c.optim.clip_norm = 0.0  # 0 disables gradient clipping
    c.optim.grad_accum_steps = 1

    c.total_steps = 100_000
    c.ema = True  # decay 0.5 ** (4 * batch_per_dataset / 10_000) per step (SPEC §6)
    # EMA half-life in optimizer updates; 0 = the release formula above (10 000 / (4·BATCH)
    # updates, far longer than a short run: its EMA would still be mostly the initialisation).
    c.ema_half_life = 0

    # Parallelism: data-parallel over a "data" mesh axis; fsdp also shards params/opt state.
    c.sharding = ml_collections.ConfigDict()
    c.sharding.fsdp = False
    c.sharding.cross_device_stats = False  # BatchNorm/CSAM statistics over the whole data axis
    c.sharding.num_devices = 0  # devices of the "data" mesh axis; 0 = all

    # Initialisation: a release-layout .pth of the whole model, or SegFormer's ImageNet mit_*.pth
    # loaded non-strictly into the backbone (SPEC §2.3). Empty = random initialisation.
    c.init_checkpoint = ""
    c.init_backbone = ""
    # EMA weights exported to WORKDIR/<export_pth> (release .pth layout) at the end; "" = off.
    c.export_pth = "fgtbt_ema.pth"

    # jax.profiler trace of steps start_step … start_step + num_steps − 1 into
    # WORKDIR/plugins/profile/ (TensorBoard's profile tab); hosts "first" (process 0) or "all".
    c.profile = ml_collections.ConfigDict()
    c.profile.start_step = 3
    c.profile.num_steps = 0  # 0 = off
    c.profile.hosts = "first"

    c.log_every = 50
    c.tensorboard = True  # TensorBoard events in WORKDIR/tb (off: JSON lines and the log only)
    # JAX's persistent compilation cache (local or gs://): restarts load the train step. "" = off.
    c.compilation_cache_dir = ""
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.eval_every = 500  # 300W
    c.eval_all_every = 5000  # all four datasets
    # Evaluation batch: one CSAM statistics group (results depend slightly on it).
    c.eval_batch_size = 8

    if preset == "tiny":
        c.data.demo_num_images = 16
        c.data.shuffle_buffer = 64
        c.data.batch_per_dataset = 2
        c.model.drop_path_rate = 0.0
        c.model.decoder_dropout = 0.0
        c.optim.lr = 1e-3
        c.optim.milestones = (150, 250)
        c.total_steps = 300
        c.ema_half_life = 25
        c.log_every = 10
        c.checkpoint_every = 100
        c.eval_every = 100
        c.eval_all_every = 300
    return c
