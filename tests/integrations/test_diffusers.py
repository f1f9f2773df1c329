"""qdrift.diffusers against real diffusers schedulers and tiny pipelines (random weights, no hub).

The schedulers are compared with the core's k-diffusion-style samplers on a model whose output does not
depend on the timestep (so the two libraries' timestep conventions cannot differ), and the pipelines are
the real StableDiffusionPipeline / StableDiffusion3Pipeline with tiny networks and made-up embeddings.
"""

import copy
import inspect
import math
import re
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
# diffusers 0.42's schedulers call np.array on tensors; numpy 2 warns about it (not ours).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

import qdrift  # noqa: E402
from qdrift.diffusers import (  # noqa: E402
    QDriftDPMSolverMultistepScheduler,
    QDriftEulerDiscreteScheduler,
    calibrate_pipeline,
    qdrift_scheduler,
)
from qdrift.hosts import calibration_from_pairs  # noqa: E402

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1)
STEPS = 6
C = 4


def eps_model(x_in, t):
    """A fixed 'network': output depends on the input only (not on t), per channel."""
    scale = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=x_in.dtype).view(1, C, 1, 1)
    return scale * x_in + 0.05 * torch.tanh(x_in)


def v_table(steps, seed=0):
    return torch.rand(steps, C, generator=torch.Generator().manual_seed(seed)) * 0.5


def run_loop(scheduler, x, steps=STEPS, seed=None, flow=False):
    """A diffusers-pipeline-shaped loop: scale_model_input, model, step(..., return_dict=False)."""
    scheduler.set_timesteps(steps)
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    kwargs = {"generator": gen} if isinstance(scheduler, EulerAncestralDiscreteScheduler) else {}
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t) if not flow else x
        out = eps_model(x_in, t)
        x = scheduler.step(out, t, x, return_dict=False, **kwargs)[0]
    return x


SCHEDULERS = {
    "euler": lambda: EulerDiscreteScheduler(**SD_BETAS),
    "euler_ancestral": lambda: EulerAncestralDiscreteScheduler(**SD_BETAS),
    "flow_euler": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
    "dpmpp_2m": lambda: DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="dpmsolver++", solver_order=2),
}


def _noise_scale(scheduler):
    scheduler.set_timesteps(STEPS)
    return float(getattr(scheduler, "init_noise_sigma", 1.0))


def zero_calibration(sigmas):
    """A real Calibration whose V is exactly 0 (identical models)."""
    xs = [[torch.randn(2, C, 3, 3) for _ in range(len(sigmas) - 1)]]
    return calibration_from_pairs(sigmas, xs, xs, xs)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_zero_v_reproduces_plain_scheduler_exactly(name):
    x = torch.randn(2, C, 5, 5, generator=torch.Generator().manual_seed(1))
    plain = SCHEDULERS[name]()
    ref = run_loop(plain, x * _noise_scale(plain), seed=7, flow=name == "flow_euler")
    for V in (torch.zeros(STEPS, C), zero_calibration(plain.sigmas[:-1].tolist() + [0.0])):
        q = qdrift_scheduler(SCHEDULERS[name](), V)
        out = run_loop(q, x * _noise_scale(q), seed=7, flow=name == "flow_euler")
        assert torch.equal(out, ref), name
    # and a positive V changes the result
    q = qdrift_scheduler(SCHEDULERS[name](), v_table(STEPS))
    out = run_loop(q, x * _noise_scale(q), seed=7, flow=name == "flow_euler")
    assert not torch.allclose(out, ref)
    assert torch.isfinite(out).all()


def _kdiff_denoiser(flow):
    if flow:
        return lambda x, s, **k: x - s.view(-1, 1, 1, 1) * eps_model(x, None)
    return lambda x, s, **k: x - s.view(-1, 1, 1, 1) * eps_model(x / (s.view(-1, 1, 1, 1) ** 2 + 1) ** 0.5, None)


@pytest.mark.parametrize(
    "name, core",
    [
        ("euler", qdrift.sample_euler_qdrift),
        ("flow_euler", qdrift.sample_euler_qdrift),
        ("dpmpp_2m", qdrift.sample_dpmpp_2m_qdrift),
        ("euler_ancestral", qdrift.sample_euler_ancestral_qdrift),
    ],
)
def test_wrapper_matches_core_sampler(name, core):
    """The diffusers Q-Drift step equals the core sampler with the same V, schedule and model."""
    torch.manual_seed(0)
    V = v_table(STEPS, seed=3)
    sched = qdrift_scheduler(SCHEDULERS[name](), V)
    sched.set_timesteps(STEPS)
    sigmas = sched.sigmas.to(torch.float32).clone()
    x = torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float32)
    flow = name == "flow_euler"
    kw = {}
    if name == "dpmpp_2m":
        # diffusers works on x = alpha * y; k-diffusion on y = x / alpha (VE).
        x_diff = x / (sigmas[0] ** 2 + 1) ** 0.5
        x_core = x
    else:
        x_diff = x_core = x
    if name == "euler_ancestral":
        g = torch.Generator().manual_seed(11)
        kw["noise_sampler"] = lambda s, sn: torch.randn(x.shape, generator=g)
    out_core = core(_kdiff_denoiser(flow), x_core, sigmas, V, disable=True, **kw)
    out_diff = run_loop(sched, x_diff, seed=11, flow=flow)
    assert torch.allclose(out_diff, out_core, rtol=1e-4, atol=1e-4), (out_diff - out_core).abs().max()
    # the correction is not a no-op here (the comparison can fail)
    plain = run_loop(SCHEDULERS[name](), x_diff, seed=11, flow=flow)
    assert (plain - out_core).abs().max() > 1e-3


def test_return_dict_forms_and_step_index():
    sched = qdrift_scheduler(EulerDiscreteScheduler(**SD_BETAS), v_table(STEPS))
    sched.set_timesteps(STEPS)
    x = torch.randn(1, C, 2, 2)
    t = sched.timesteps[0]
    out = sched.step(eps_model(sched.scale_model_input(x, t), t), t, x)
    assert hasattr(out, "prev_sample") and hasattr(out, "pred_original_sample")
    assert sched.step_index == 1
    tup = sched.step(eps_model(out.prev_sample, sched.timesteps[1]), sched.timesteps[1], out.prev_sample, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 2


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="Q-Drift supports"):
        qdrift_scheduler(DDIMScheduler(), None)
    with pytest.raises(ValueError, match="dpmsolver\\+\\+"):
        qdrift_scheduler(DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), None)
    with pytest.raises(ValueError, match="strength"):
        qdrift_scheduler(EulerDiscreteScheduler(), None, strength=-1.0)
    with pytest.raises(ValueError, match="V table"):
        qdrift_scheduler(EulerDiscreteScheduler(), -torch.ones(3))
    sched = qdrift_scheduler(EulerDiscreteScheduler(**SD_BETAS), torch.ones(STEPS, 3))
    sched.set_timesteps(STEPS)
    x = torch.randn(1, C, 2, 2)
    with pytest.raises(ValueError, match="3 channels but the latents have 4"):
        sched.step(torch.zeros_like(x), sched.timesteps[0], x)
    sched = qdrift_scheduler(EulerDiscreteScheduler(**SD_BETAS), torch.ones(STEPS + 1, C))
    sched.set_timesteps(STEPS)
    with pytest.raises(ValueError, match="one row per step"):
        sched.step(torch.zeros_like(x), sched.timesteps[0], x)
    sched = qdrift_scheduler(EulerDiscreteScheduler(**SD_BETAS), torch.ones(STEPS, C))
    sched.set_timesteps(STEPS)
    with pytest.raises(ValueError, match="s_churn"):
        sched.step(torch.zeros_like(x), sched.timesteps[0], x, s_churn=1.0)


def test_packed_latents_channel_dim():
    """FLUX-style packed latents [B, tokens, C]: channel_dim=-1 applies V along the last axis."""
    V = torch.tensor([[0.0, 2.0]] * STEPS)
    sched = qdrift_scheduler(FlowMatchEulerDiscreteScheduler(), V, channel_dim=-1)
    plain = FlowMatchEulerDiscreteScheduler()
    x = torch.randn(1, 5, 2)
    for s in (sched, plain):
        s.set_timesteps(STEPS)
    t = sched.timesteps[0]
    v = torch.randn(1, 5, 2)
    a, b = sched.step(v, t, x).prev_sample, plain.step(v, t, x).prev_sample
    assert torch.equal(a[..., 0], b[..., 0]) and not torch.allclose(a[..., 1], b[..., 1])


# ---------------------------------------------------------------- tiny real pipelines


def _fake_quant(module, bits=3):
    q = copy.deepcopy(module)
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for p in q.parameters():
            if p.ndim >= 2:
                scale = p.abs().amax(dim=tuple(range(1, p.ndim)), keepdim=True).clamp(min=1e-8) / qmax
                p.copy_((p / scale).round().clamp(-qmax, qmax) * scale)
    return q


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8,), norm_num_groups=8, latent_channels=C, in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), layers_per_block=1,
    )


@pytest.fixture(scope="module")
def sd_pipes():
    pytest.importorskip("transformers")
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=C, out_channels=C, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
    )

    def make(net):
        pipe = StableDiffusionPipeline(
            vae=_tiny_vae(), text_encoder=None, tokenizer=None, unet=net, scheduler=EulerDiscreteScheduler(**SD_BETAS),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make(unet), make(_fake_quant(unet))


def _prompts(n, dim=16, tokens=5):
    g = torch.Generator().manual_seed(5)
    return [
        {"prompt_embeds": torch.randn(1, tokens, dim, generator=g), "negative_prompt_embeds": torch.zeros(1, tokens, dim)}
        for _ in range(n)
    ]


SD_CALL = dict(height=8, width=8)


def test_calibrate_pipeline_sd(sd_pipes):
    fp, q = sd_pipes
    orig = (fp.scheduler, q.scheduler)
    cal = calibrate_pipeline(fp, q, _prompts(2), K=3, num_inference_steps=5, guidance_scale=4.0, call_kwargs=SD_CALL)
    assert (fp.scheduler, q.scheduler) == orig  # restored
    ref = EulerDiscreteScheduler(**SD_BETAS)
    ref.set_timesteps(5)
    assert cal.steps == 5 and cal.channels == C and cal.meta["K"] == 3
    assert torch.allclose(cal.sigmas, ref.sigmas[:-1].double(), rtol=1e-6)
    assert torch.isfinite(cal.V).all() and (cal.V > 0).all()
    # the sizing runs (on by default): one quantized Q-Drift Euler run per recorded run, against its states
    info = cal.meta["drift_scale"]
    assert info["K"] == 3 and info["sampler"] == "euler" and info["steps"] == 5
    assert all(v > 0 for v in info["measured"]) and all(v > 0 for v in info["predicted"])
    assert bool(torch.isfinite(cal.drift_scale).all())
    # each sizing run is paired with a plain quantized run from the same seed, which sizes the output correction
    share = cal.output_scale
    assert share is not None and share.shape == (C,) and bool(((share >= 0) & (share <= 1)).all())
    assert set(info["output"]) >= {"aa", "ab", "bb"} and all(v > 0 for v in info["output"]["aa"])
    plain = calibrate_pipeline(fp, q, _prompts(2), K=3, num_inference_steps=5, guidance_scale=4.0, call_kwargs=SD_CALL,
                               size_drift=False)
    assert "drift_scale" not in plain.meta and torch.equal(plain.V, cal.V)
    # identical models: exactly no quantization error, and the sizing run retraces the recorded states exactly
    cal0 = calibrate_pipeline(fp, fp, _prompts(1), K=1, num_inference_steps=5, guidance_scale=4.0, call_kwargs=SD_CALL)
    assert torch.equal(cal0.V, torch.zeros_like(cal0.V))
    # (exactly 0 with the default four bands too: a gain equal across a channel's bands skips the FFT)
    assert cal0.meta["drift_scale"]["measured"] == [0.0] * C
    one = calibrate_pipeline(fp, fp, _prompts(1), K=1, num_inference_steps=5, guidance_scale=4.0, call_kwargs=SD_CALL,
                             bands=1)
    assert one.bands == 1 and cal0.bands == 4 and one.meta["drift_scale"]["measured"] == [0.0] * C
    # the calibration drives the DPM-Solver++ wrapper inside the real pipeline; V = 0 reproduces it exactly
    args = dict(_prompts(1)[0], num_inference_steps=6, guidance_scale=4.0, output_type="latent", **SD_CALL)
    base = DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="dpmsolver++")
    q.scheduler = base
    plain = q(**args, generator=torch.Generator().manual_seed(3)).images
    q.scheduler = qdrift_scheduler(base, cal0)
    same = q(**args, generator=torch.Generator().manual_seed(3)).images
    q.scheduler = qdrift_scheduler(base, cal, strength=50.0)
    corrected = q(**args, generator=torch.Generator().manual_seed(3)).images
    q.scheduler = orig[1]
    assert torch.equal(same, plain)
    assert torch.isfinite(corrected).all() and not torch.allclose(corrected, plain)
    assert isinstance(qdrift_scheduler(base, cal), QDriftDPMSolverMultistepScheduler)


def test_calibrate_pipeline_sd3_flow():
    pytest.importorskip("transformers")
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=C, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=C,
    )

    def make(net):
        pipe = StableDiffusion3Pipeline(
            transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_tiny_vae(), text_encoder=None,
            tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    fp, q = make(tr), make(_fake_quant(tr))
    prompts = [
        dict(p, pooled_prompt_embeds=torch.randn(1, 8), negative_pooled_prompt_embeds=torch.zeros(1, 8))
        for p in _prompts(2)
    ]
    cal = calibrate_pipeline(fp, q, prompts, K=2, num_inference_steps=4, guidance_scale=3.0, call_kwargs=SD_CALL,
                             size_drift=True)
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(4)
    assert torch.allclose(cal.sigmas, ref.sigmas[:-1].double(), rtol=1e-6)  # flow time t
    assert (cal.V > 0).all() and math.isfinite(float(cal.V.sum()))
    assert cal.meta["drift_scale"]["K"] == 2 and all(v > 0 for v in cal.meta["drift_scale"]["measured"])
    # the default ("auto") does not size a flow model (measured worse there): the same calibration, unsized
    auto = calibrate_pipeline(fp, q, prompts, K=2, num_inference_steps=4, guidance_scale=3.0, call_kwargs=SD_CALL)
    assert "drift_scale" not in auto.meta and torch.equal(auto.V, cal.V)
    args = dict(prompts[0], num_inference_steps=4, guidance_scale=3.0, output_type="latent", **SD_CALL)
    plain = q(**args, generator=torch.Generator().manual_seed(1)).images
    q.scheduler = qdrift_scheduler(q.scheduler, cal)
    corrected = q(**args, generator=torch.Generator().manual_seed(1)).images
    assert torch.isfinite(corrected).all() and not torch.equal(corrected, plain)


def test_calibrate_pipeline_flux_packed_latents_sizes_per_channel():
    """A tiny real FluxPipeline: packed latents [B, tokens, 16] (channel_dim=-1). The calibration and its sizing
    run see 16 channels; identical models give exactly no error and a measured accumulation of exactly 0 (the
    sizing run retraces the recorded packed states); the calibration drives the flow Euler wrapper."""
    pytest.importorskip("transformers")
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
    )

    def make(net):
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(), text_encoder=None,
                            tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=net)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    fp, q = make(tr), make(_fake_quant(tr))
    g = torch.Generator().manual_seed(5)
    prompts = [dict(prompt_embeds=torch.randn(1, 5, 16, generator=g), pooled_prompt_embeds=torch.randn(1, 8, generator=g))
               for _ in range(2)]
    call = dict(height=16, width=16)
    cal = calibrate_pipeline(fp, q, prompts, K=2, num_inference_steps=4, guidance_scale=3.0, call_kwargs=call,
                             channel_dim=-1, size_drift=True)
    assert cal.channels == 16 and cal.V.shape == (4, 16) and bool((cal.V > 0).all())
    info = cal.meta["drift_scale"]
    assert info["K"] == 2 and len(info["measured"]) == 16 and all(v > 0 for v in info["measured"])
    assert cal.drift_scale.shape == (16,) and bool(torch.isfinite(cal.drift_scale).all())
    same = calibrate_pipeline(fp, fp, prompts[:1], K=1, num_inference_steps=4, guidance_scale=3.0, call_kwargs=call,
                              channel_dim=-1, size_drift=True)
    assert torch.equal(same.V, torch.zeros_like(same.V)) and same.meta["drift_scale"]["measured"] == [0.0] * 16
    args = dict(prompts[0], num_inference_steps=4, guidance_scale=3.0, output_type="latent", **call)
    plain = q(**args, generator=torch.Generator().manual_seed(1)).images
    q.scheduler = qdrift_scheduler(q.scheduler, cal, channel_dim=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qdrift.DriftClippedWarning)  # 3-bit weights on a 1-layer net: a large error
        corrected = q(**args, generator=torch.Generator().manual_seed(1)).images
    assert corrected.shape == plain.shape == (1, 64, 16)
    assert torch.isfinite(corrected).all() and not torch.equal(corrected, plain)


def test_calibrate_pipeline_rejects_bad_arguments(sd_pipes):
    fp, q = sd_pipes
    with pytest.raises(ValueError, match="K must be"):
        calibrate_pipeline(fp, q, _prompts(1), K=0)
    with pytest.raises(ValueError, match="prompts"):
        calibrate_pipeline(fp, q, "a cat", K=1)
    with pytest.raises(ValueError, match="diffusers pipeline"):
        calibrate_pipeline(object(), q, _prompts(1), K=1)
    with pytest.raises(ValueError, match="string or a dict"):
        calibrate_pipeline(fp, q, [3], K=1)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_step_signature_is_the_diffusers_one(name):
    """Pipelines pass ``generator``/``eta`` only if ``step``'s signature has them."""
    plain = SCHEDULERS[name]()
    wrapped = qdrift_scheduler(plain, None)
    assert inspect.signature(wrapped.step).parameters.keys() == inspect.signature(plain.step).parameters.keys()


def test_ancestral_in_pipeline_uses_the_callers_generator(sd_pipes):
    _, q = sd_pipes
    orig = q.scheduler
    args = dict(_prompts(1)[0], num_inference_steps=4, guidance_scale=4.0, output_type="latent", **SD_CALL)
    try:
        q.scheduler = EulerAncestralDiscreteScheduler(**SD_BETAS)
        plain = q(**args, generator=torch.Generator().manual_seed(8)).images
        q.scheduler = qdrift_scheduler(q.scheduler, torch.zeros(4, C))
        torch.manual_seed(123)  # the global RNG must not matter
        same = q(**args, generator=torch.Generator().manual_seed(8)).images
    finally:
        q.scheduler = orig
    assert torch.equal(same, plain)


def test_qdrift_euler_subclass_is_a_diffusers_scheduler():
    s = qdrift_scheduler(EulerDiscreteScheduler(**SD_BETAS), None)
    assert isinstance(s, EulerDiscreteScheduler) and isinstance(s, QDriftEulerDiscreteScheduler)
    assert s.qdrift_calibration is None


def test_calibration_of_another_channel_count_and_nan_outputs_are_refused():
    """Issue 12: a Calibration must match the latents' channels (only a plain tensor broadcasts); a NaN model
    output is refused, with or without a calibration."""
    sig = torch.tensor([10.0, 1.0, 0.0], dtype=torch.float64)
    xs = [[torch.randn(2, 1, 3, dtype=torch.float64) for _ in range(2)]]
    one_channel = calibration_from_pairs(sig, xs, [[x * 0.5 for x in xs[0]]], [[x * 0.4 for x in xs[0]]])
    x = torch.randn(1, C, 2, 2)
    sched = qdrift_scheduler(EulerDiscreteScheduler(**SD_BETAS), one_channel)
    sched.set_timesteps(STEPS)
    with pytest.raises(ValueError, match="1 channel.*latents have 4.*another model or latent format"):
        sched.step(torch.zeros_like(x), sched.timesteps[0], x)
    plain = qdrift_scheduler(EulerDiscreteScheduler(**SD_BETAS), torch.full((STEPS,), 0.01))
    plain.set_timesteps(STEPS)
    assert torch.isfinite(plain.step(torch.zeros_like(x), plain.timesteps[0], x).prev_sample).all()
    for calibration in (None, torch.full((STEPS,), 0.01)):
        sched = qdrift_scheduler(EulerDiscreteScheduler(**SD_BETAS), calibration)
        sched.set_timesteps(STEPS)
        with pytest.raises(ValueError, match="model output at timestep .* NaN or inf"):
            sched.step(torch.full_like(x, float("nan")), sched.timesteps[0], x)


def eps_model_q(x_in, t):
    """The 'quantized' network: a gain, an offset and a nonlinear error on eps_model's output."""
    return eps_model(x_in, t) * 1.1 + 0.05 + 0.05 * torch.sin(3 * x_in)


def _denoiser_of(net, flow):
    if flow:
        return lambda x, s, **k: x - s.view(-1, 1, 1, 1) * net(x, None)
    return lambda x, s, **k: x - s.view(-1, 1, 1, 1) * net(x / (s.view(-1, 1, 1, 1) ** 2 + 1) ** 0.5, None)


@pytest.mark.parametrize("method", ["v2", "v2-bands", "exact", "matched"])
@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "flow_euler"])
def test_wrapper_matches_core_sampler_for_every_method(name, method):
    """With a real Calibration the diffusers step runs the core's DriftPlan: the same result as the core sampler
    with the same method (Q-Drift v2's gain and bias, per channel or per frequency band, exact balance,
    moment-matching tables)."""
    bands = 2 if method == "v2-bands" else 1
    method = "v2" if method == "v2-bands" else method
    flow = name == "flow_euler"
    core_name = "euler_ancestral" if name == "euler_ancestral" else "euler"
    sched = SCHEDULERS[name]()
    sched.set_timesteps(STEPS)
    sigmas = sched.sigmas.to(torch.float32).clone()
    fp, q = _denoiser_of(eps_model, flow), _denoiser_of(eps_model_q, flow)
    noise = torch.randn(6, C, 4, 4, generator=torch.Generator().manual_seed(4)) * sigmas[0]
    cal = qdrift.calibrate(fp, q, noise, sigmas, disable=True, bands=bands)
    if method == "matched":
        cal = qdrift.match_moments(cal, fp, q, noise, sigmas, core_name)
    em = cal.error_model(cal.sigmas, gain=True)
    assert float(em["k"].abs().max()) > 0  # a gain to correct
    assert bool((em["j"] != 0).any())  # and a state term (the output correction's j x / sigma, also per increment)
    x = torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(2))

    def core(V, **kw):
        if name == "euler_ancestral":
            g = torch.Generator().manual_seed(11)
            kw["noise_sampler"] = lambda s, sn: torch.randn(x.shape, generator=g)
        return qdrift.SAMPLERS[core_name](q, x, sigmas, V, disable=True, flow=flow, **kw)

    sched = qdrift_scheduler(SCHEDULERS[name](), cal, method=method)
    sched.set_timesteps(STEPS)
    gen = torch.Generator().manual_seed(11)
    kwargs = {"generator": gen} if name == "euler_ancestral" else {}
    out_diff = x
    for t in sched.timesteps:
        x_in = out_diff if flow else sched.scale_model_input(out_diff, t)
        out_diff = sched.step(eps_model_q(x_in, t), t, out_diff, return_dict=False, **kwargs)[0]
    out_core = core(cal, method=method)
    assert torch.allclose(out_diff, out_core, rtol=1e-4, atol=1e-4), (out_diff - out_core).abs().max()
    assert (core(None) - out_core).abs().max() > 1e-4  # the correction is not a no-op here


# ---------------------------------------------------------------- img2img (begin index) and reused schedulers

_CORE_NAME = {"euler": "euler", "euler_ancestral": "euler_ancestral", "flow_euler": "euler", "dpmpp_2m": "dpmpp_2m"}


def _noisy(den, var=0.03, seed=1):
    """A 'quantized' denoiser with a fresh random error of variance ``var`` on its direction at every call
    (d_hat = d + sqrt(var) z): a residual error the drift of methods v2 / exact must take up at every step."""
    g = torch.Generator().manual_seed(seed)
    return lambda x, s, **k: den(x, s) - s.reshape(-1, 1, 1, 1) * var**0.5 * torch.randn(x.shape, generator=g)


def _calibration_for(name, matched=False, var=0.03):
    """A real Calibration of a noisy version of the 'network' on the scheduler's own schedule of STEPS steps
    (with moment-matching tables for the core sampler of ``name`` when ``matched``)."""
    sched = SCHEDULERS[name]()
    sched.set_timesteps(STEPS)
    sigmas = sched.sigmas.to(torch.float32).clone()
    fp = _denoiser_of(eps_model, name == "flow_euler")
    q = _noisy(fp, var)
    noise = torch.randn(6, C, 4, 4, generator=torch.Generator().manual_seed(4)) * sigmas[0]
    cal = qdrift.calibrate(fp, q, noise, sigmas, disable=True)
    return qdrift.match_moments(cal, fp, q, noise, sigmas, _CORE_NAME[name]) if matched else cal


def _partial_start(name, sigma, seed=2):
    """An img2img start at level ``sigma``: an image latent noised to it (VE: x0 + s n; flow: (1 - t) x0 + t n)."""
    g = torch.Generator().manual_seed(seed)
    x0, n = torch.randn(2, C, 4, 4, generator=g), torch.randn(2, C, 4, 4, generator=g)
    return (1 - sigma) * x0 + sigma * n if name == "flow_euler" else x0 + sigma * n


def _run_from(sched, x, steps, begin=0, seed=11, set_begin=True):
    """A diffusers-pipeline-shaped loop over ``timesteps[begin:]`` (img2img calls ``set_begin_index(begin)``;
    ``set_begin=False``: the scheduler finds its index from the first timestep, as pipelines without it do)."""
    sched.set_timesteps(steps)
    if set_begin:
        sched.set_begin_index(begin)
    flow = isinstance(sched, FlowMatchEulerDiscreteScheduler)
    kwargs = {"generator": torch.Generator().manual_seed(seed)} if isinstance(sched, EulerAncestralDiscreteScheduler) else {}
    for t in sched.timesteps[begin:]:
        x_in = x if flow else sched.scale_model_input(x, t)  # DPM-Solver++: x itself (x = alpha y, the VE input)
        x = sched.step(eps_model_q(x_in, t), t, x, return_dict=False, **kwargs)[0]
    return x


def _core_from(name, x, sigmas, cal, method, seed=11):
    kw = {}
    if name == "euler_ancestral":
        g = torch.Generator().manual_seed(seed)
        kw["noise_sampler"] = lambda s, sn: torch.randn(x.shape, generator=g)
    flow = name == "flow_euler"
    return qdrift.SAMPLERS[_CORE_NAME[name]](_denoiser_of(eps_model_q, flow), x, sigmas, cal, disable=True,
                                             method=method, flow=flow, **kw)


@pytest.mark.parametrize("method", ["v2", "exact"])
@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "flow_euler"])
def test_img2img_begin_index_matches_core_sampler_on_the_tail(name, method):
    """img2img (diffusers' ``set_begin_index``, or the index found from the first timestep): the run over
    ``timesteps[begin:]`` equals the core sampler on ``sigmas[begin:]`` with the same method. The plan must be
    built at the run's first step from ``sigmas[begin:]`` (it used to be built from the whole schedule, so the
    surrogate started at sigmas[0] and the steps were matched to the wrong levels)."""
    cal = _calibration_for(name)
    begin = 3
    sched = SCHEDULERS[name]()
    sched.set_timesteps(STEPS)
    sigmas = sched.sigmas.to(torch.float32).clone()
    x = _partial_start(name, float(sigmas[begin]))
    out_core = _core_from(name, x, sigmas[begin:], cal, method)
    assert (_core_from(name, x, sigmas[begin:], None, method) - out_core).abs().max() > 5e-4  # not a no-op
    for set_begin in (True, False):
        out_diff = _run_from(qdrift_scheduler(SCHEDULERS[name](), cal, method=method), x, STEPS, begin,
                             set_begin=set_begin)
        assert torch.allclose(out_diff, out_core, rtol=1e-5, atol=1e-5), (set_begin, (out_diff - out_core).abs().max())


def _check_reuse(name, method):
    cal = _calibration_for(name, matched=method == "matched")
    probe = SCHEDULERS[name]()
    probe.set_timesteps(STEPS)
    x_full = torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(2)) * _noise_scale(probe)
    x_img = _partial_start(name, float(probe.sigmas[3]))
    reused = qdrift_scheduler(SCHEDULERS[name](), cal, method=method)
    # a longer txt2img run, img2img from two begin indices, a full run, img2img again
    runs = [(10, 0, x_full), (STEPS, 3, x_img), (STEPS, 2, x_img), (STEPS, 0, x_full), (STEPS, 3, x_img)]
    for steps, begin, x in runs:
        got = _run_from(reused, x, steps, begin)
        want = _run_from(qdrift_scheduler(SCHEDULERS[name](), cal, method=method), x, steps, begin)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), (steps, begin, (got - want).abs().max())


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "flow_euler"])
def test_reused_scheduler_gives_the_same_result_as_a_fresh_one(name):
    """One scheduler object for several runs (a pipeline keeps its scheduler): after a run of another length, or
    an img2img run from another begin index, each run gives exactly what a fresh scheduler gives (Q-Drift v2's
    plan of the previous run must not be carried into the next one)."""
    _check_reuse(name, "v2")


@pytest.mark.parametrize("name, method", [("dpmpp_2m", "v2"), ("dpmpp_2m", "matched"), ("euler", "matched")])
def test_reused_scheduler_gives_the_same_result_as_a_fresh_one_stateless_rules(name, method):
    """The same for the corrections whose step rule keeps no state across steps (DPM-Solver++'s paper rule, the
    moment-matching tables): a guard, these never depended on the plan's start."""
    _check_reuse(name, method)


def test_dpmpp_img2img_begin_index_matches_core_sampler_on_the_tail():
    """The DPM-Solver++ wrapper (the paper's rule with a Calibration) over ``timesteps[begin:]`` equals the core
    2M sampler on ``sigmas[begin:]`` (in k-diffusion's y = x / alpha)."""
    cal = _calibration_for("dpmpp_2m")
    begin = 3
    sched = SCHEDULERS["dpmpp_2m"]()
    sched.set_timesteps(STEPS)
    sigmas = sched.sigmas.to(torch.float32).clone()
    y = _partial_start("dpmpp_2m", float(sigmas[begin]))
    out_core = _core_from("dpmpp_2m", y, sigmas[begin:], cal, "paper")
    assert (_core_from("dpmpp_2m", y, sigmas[begin:], None, "paper") - out_core).abs().max() > 1e-3
    out_diff = _run_from(qdrift_scheduler(SCHEDULERS["dpmpp_2m"](), cal), y / (sigmas[begin] ** 2 + 1) ** 0.5, STEPS,
                         begin)
    assert torch.allclose(out_diff, out_core, rtol=1e-4, atol=1e-4), (out_diff - out_core).abs().max()


@pytest.mark.parametrize("method", ["v2", "exact"])
def test_ancestral_wrapper_lowers_its_noise_as_the_core_sampler_does(method):
    """An error large enough that the ancestral steps' bounded drift leaves excess: the core sampler lowers the
    ancestral noise by it, and so does the wrapper, by scaling the noise the scheduler drew (it used to keep the
    noise, and differed from the core by up to 4 in such runs)."""
    cal = _calibration_for("euler_ancestral", var=0.1)
    sched = SCHEDULERS["euler_ancestral"]()
    sched.set_timesteps(STEPS)
    sigmas = sched.sigmas.to(torch.float32).clone()
    x = torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(2)) * _noise_scale(sched)
    out_core = _core_from("euler_ancestral", x, sigmas, cal, method)
    out_diff = _run_from(qdrift_scheduler(SCHEDULERS["euler_ancestral"](), cal, method=method), x, STEPS)
    assert torch.allclose(out_diff, out_core, rtol=1e-5, atol=1e-5), (out_diff - out_core).abs().max()
    keeps = qdrift_scheduler(SCHEDULERS["euler_ancestral"](), cal, method=method)
    keeps._qdrift_lowers_noise = False  # the noise left as drawn: here that is not the core's result
    assert (_run_from(keeps, x, STEPS) - out_core).abs().max() > 1e-3


# ---------------------------------------------------------------- argument checks (review 2)


class _NeverRun:
    """A pipeline stand-in that fails the test if it is ever called (the arguments must be checked first)."""

    def __init__(self):
        self.scheduler = EulerDiscreteScheduler(**SD_BETAS)

    def __call__(self, **kwargs):
        raise AssertionError("a pipeline ran before calibrate_pipeline checked its arguments")


_BAD_CALIBRATE_ARGS = [
    ("seed", "1"), ("seed", 1.5), ("seed", True), ("seed", 2**64), ("seed", -(2**63) - 1),
    ("channel_dim", "1"), ("channel_dim", 1.0), ("channel_dim", True),
    ("reduce", "chanel"), ("reduce", None),
    ("trim", "4"), ("trim", float("nan")), ("trim", -1.0), ("trim", True), ("trim", np.float32("nan")),
    ("bands", 0), ("bands", "2"), ("bands", 1.5), ("bands", True),
    ("call_kwargs", [1]), ("call_kwargs", "height=8"), ("call_kwargs", {"generator": None}), ("call_kwargs", {1: 2}),
    ("conditional", "yes"), ("conditional", 1), ("progress", 0),
    ("size_drift", None), ("size_drift", "no"), ("size_drift", "Auto"),
    ("K", 1.0), ("K", np.int64(0)), ("K", True),
    ("num_inference_steps", np.float64(3)), ("num_inference_steps", True), ("num_inference_steps", 0),
    ("guidance_scale", "4"), ("guidance_scale", True), ("guidance_scale", np.float32("nan")),
    ("guidance_scale", np.float64("inf")),
]


@pytest.mark.parametrize("name, value", _BAD_CALIBRATE_ARGS, ids=[f"{n}={v!r}" for n, v in _BAD_CALIBRATE_ARGS])
def test_calibrate_pipeline_checks_every_argument_before_any_run(name, value):
    """Review 2: every argument of calibrate_pipeline is checked up front, before any pipeline runs, with a
    ValueError naming calibrate_pipeline, the argument and its value (typos in reduce / trim / bands used to be
    caught only after all 2K pipeline runs; seed, channel_dim and call_kwargs gave bare TypeErrors / IndexErrors
    from torch or dict)."""
    never = _NeverRun()
    args = dict(K=1, num_inference_steps=3, call_kwargs=SD_CALL)
    args[name] = value
    with pytest.raises(ValueError, match=f"calibrate_pipeline: {name} ") as err:
        calibrate_pipeline(never, never, _prompts(1), **args)
    if name != "call_kwargs":
        assert repr(value) in str(err.value)
    with pytest.raises(ValueError, match="calibrate_pipeline: a prompt dict must not hold 'generator'"):
        calibrate_pipeline(never, never, [dict(_prompts(1)[0], generator=None)], K=1)


def test_calibrate_pipeline_accepts_numpy_arguments_bit_for_bit(sd_pipes):
    """Review 2: numpy integers / floats / bools are accepted where Python ones are (np.int64 seeds used to fail
    with "an integer is required", numpy K / steps / guidance with "must be an int / a finite number"), and give
    exactly the Python arguments' calibration."""
    fp, q = sd_pipes
    common = dict(call_kwargs=SD_CALL)
    ref = calibrate_pipeline(fp, q, _prompts(2), 2, num_inference_steps=3, guidance_scale=4.0, seed=1, trim=3.0,
                             bands=2, channel_dim=1, conditional=True, size_drift=True, **common)
    got = calibrate_pipeline(fp, q, _prompts(2), np.int64(2), num_inference_steps=np.int32(3),
                             guidance_scale=np.float32(4.0), seed=np.int64(1), trim=np.float32(3.0), bands=np.int64(2),
                             channel_dim=np.int64(1), conditional=np.bool_(True), size_drift=np.bool_(True),
                             progress=torch.tensor(False), **common)
    assert torch.equal(got.V, ref.V) and torch.equal(got.drift_scale, ref.drift_scale)
    assert got.banded is not None and torch.equal(got.banded.V, ref.banded.V)
    timing = lambda meta: {k: v for k, v in meta.items() if k != "seconds"}  # noqa: E731 (wall time)
    assert {k: timing(v) if k == "drift_scale" else v for k, v in got.meta.items()} == {
        k: timing(v) if k == "drift_scale" else v for k, v in ref.meta.items()}
    assert type(got.meta["seed"]) is int and type(got.meta["num_inference_steps"]) is int


@pytest.mark.parametrize("channel_dim", [4, 5, -5, 0])
def test_calibrate_pipeline_channel_dim_out_of_range_is_a_clear_error(sd_pipes, channel_dim):
    """Review 2: a channel_dim that is not a channel axis of the latents (out of range, or the batch axis 0) is a
    ValueError at the first scheduler step, before any statistics (it was a bare IndexError from movedim, or for
    0 a calibration over the batch axis); the pipelines get their schedulers back."""
    fp, q = sd_pipes
    orig = (fp.scheduler, q.scheduler)
    msg = (f"calibrate_pipeline: channel_dim={channel_dim} is not a channel axis of the pipeline's 4-D latents of "
           f"shape {re.escape(str((1, C, 8, 8)))}")
    with pytest.raises(ValueError, match=msg):
        calibrate_pipeline(fp, q, _prompts(1), K=1, num_inference_steps=3, guidance_scale=4.0, call_kwargs=SD_CALL,
                           channel_dim=channel_dim)
    assert (fp.scheduler, q.scheduler) == orig


def test_scheduler_accepts_numpy_strength_and_channel_dim():
    """Review 2: set_calibration / qdrift_scheduler take numpy numbers for strength and channel_dim (as the core
    samplers do), with exactly the Python numbers' result; bools, NaN, inf and negative strengths stay refused."""
    V = v_table(STEPS)
    x = torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(1)) * _noise_scale(SCHEDULERS["euler"]())
    ref = run_loop(qdrift_scheduler(EulerDiscreteScheduler(**SD_BETAS), V, strength=0.5, channel_dim=1), x)
    for strength, dim in ((np.float32(0.5), np.int64(1)), (np.float64(0.5), np.int32(1))):
        got = run_loop(qdrift_scheduler(EulerDiscreteScheduler(**SD_BETAS), V, strength=strength, channel_dim=dim), x)
        assert torch.equal(got, ref)
        s = QDriftEulerDiscreteScheduler(**SD_BETAS).set_calibration(V, strength=strength, channel_dim=dim)
        assert torch.equal(run_loop(s, x), ref)
        assert type(s._qdrift_strength) is float and type(s._qdrift_channel_dim) is int
    two = run_loop(qdrift_scheduler(EulerDiscreteScheduler(**SD_BETAS), V, strength=2), x)
    assert torch.equal(run_loop(qdrift_scheduler(EulerDiscreteScheduler(**SD_BETAS), V, strength=np.int64(2)), x), two)
    for bad in (True, np.bool_(True), float("nan"), np.float32("nan"), -1.0, np.float64(-0.5), float("inf"),
                np.float32("inf"), "1", None):
        with pytest.raises(ValueError, match="set_calibration: strength must be a finite number >= 0"):
            qdrift_scheduler(EulerDiscreteScheduler(**SD_BETAS), V, strength=bad)
    for bad in (True, np.bool_(True), 1.0, np.float64(1), "1", None):
        with pytest.raises(ValueError, match="set_calibration: channel_dim must be an int"):
            qdrift_scheduler(EulerDiscreteScheduler(**SD_BETAS), V, channel_dim=bad)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_non_finite_corrected_step_raises(name):
    """Review 2: a Q-Drift step whose corrected result holds NaN / inf while the plain step's is finite raises a
    ValueError naming the scheduler, the step and sigma (it was returned silently, and reached the image)."""
    sched = qdrift_scheduler(SCHEDULERS[name](), torch.full((STEPS, C), 1e38))  # finite V, but c * delta overflows
    plain = SCHEDULERS[name]()
    x = torch.randn(1, C, 2, 2, generator=torch.Generator().manual_seed(0))
    x = x * _noise_scale(sched)
    plain.set_timesteps(STEPS)
    t = plain.timesteps[0]
    out = eps_model(x, t) * 1e5
    kw = {"generator": torch.Generator().manual_seed(0)} if name == "euler_ancestral" else {}
    assert torch.isfinite(plain.step(out, t, x, **kw).prev_sample).all()
    cls = type(sched).__name__
    with pytest.raises(ValueError, match=rf"{cls}: the Q-Drift step 0 of {STEPS} \(sigma=[0-9.e+]+, .*NaN or inf"):
        sched.step(out, t, x, **kw)


def test_non_finite_corrected_step_raises_for_the_plan_methods(monkeypatch):
    """The same check covers the plan path (v2 and the other error-model methods), and leaves a step alone whose
    plain result is already non-finite (the correction is not what broke it)."""
    cal = _calibration_for("euler")
    sched = qdrift_scheduler(EulerDiscreteScheduler(**SD_BETAS), cal, method="v2")
    sched.set_timesteps(STEPS)
    x = torch.randn(1, C, 2, 2, generator=torch.Generator().manual_seed(0)) * _noise_scale(sched)
    t = sched.timesteps[0]
    monkeypatch.setattr(sched, "_qdrift_plan_step", lambda i, method, sample, prev, *a: prev * float("nan"))
    with pytest.raises(ValueError, match=r"QDriftEulerDiscreteScheduler: the Q-Drift step 0 .*method 'v2'.*NaN or inf"):
        sched.step(eps_model(x, t), t, x)
    paper = qdrift_scheduler(EulerDiscreteScheduler(**SD_BETAS), v_table(STEPS))
    paper.set_timesteps(STEPS)
    x_inf = x.clone()
    x_inf[0, 0, 0, 0] = float("inf")
    out = paper.step(torch.zeros_like(x), t, x_inf).prev_sample  # the plain step is inf there too: no error
    assert not torch.isfinite(out).all()
