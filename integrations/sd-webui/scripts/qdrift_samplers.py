"""Q-Drift samplers for Stable Diffusion WebUI Forge and AUTOMATIC1111 (1.6+).

Registers "Euler Q-Drift", "Euler a Q-Drift", "Heun Q-Drift", "LMS Q-Drift", "DPM++ 2M Q-Drift",
"DPM++ 2M SDE Q-Drift" and "DPM++ 3M SDE Q-Drift" as sampler entries (aliases ``qdrift_euler``... select them too), adds a "Q-Drift" settings section
(calibration file, strength, V per channel or pooled) and a per-generation "Q-Drift" panel. The logic lives
in ``qdrift.hosts.webui``; this file only hands it the host's modules.
"""

import os

import gradio as gr

from modules import script_callbacks, scripts, sd_samplers, sd_samplers_common, sd_samplers_kdiffusion, shared
from modules.sd_samplers_kdiffusion import KDiffusionSampler

from qdrift.hosts import webui

try:
    from modules import paths

    MODELS_DIR = paths.models_path
except (ImportError, AttributeError):  # very old hosts
    MODELS_DIR = None

try:
    import k_diffusion.sampling as kdiffusion_sampling
except ImportError:  # the host always has it; the seeded-noise hook is skipped without it
    kdiffusion_sampling = None

SETTINGS = webui.Settings(shared.opts, MODELS_DIR)
# sampler_extra_params: the host passes s_churn / s_tmin / s_tmax / s_noise only to the functions listed there.
ENTRIES = webui.sampler_entries(sd_samplers_common.SamplerData, KDiffusionSampler, SETTINGS, kdiffusion_sampling,
                                getattr(sd_samplers_kdiffusion, "sampler_extra_params", None))
REGISTERED = webui.register_samplers(sd_samplers, ENTRIES)


def on_app_started(*_args):
    """Forge rebuilds the sampler map whenever an extension adds a sampler: add the aliases again."""
    webui.register_aliases(sd_samplers, ENTRIES)


if hasattr(script_callbacks, "on_app_started"):
    script_callbacks.on_app_started(on_app_started)


def on_ui_settings():
    section = ("qdrift", "Q-Drift")
    shared.opts.add_option(
        "qdrift_calibration",
        shared.OptionInfo("", "Calibration file (from qdrift; absolute, or relative to models/qdrift)", section=section),
    )
    shared.opts.add_option(
        "qdrift_strength",
        shared.OptionInfo(1.0, "Strength (multiplier on V; 0 = plain sampler)", gr.Slider,
                          {"minimum": 0.0, "maximum": 5.0, "step": 0.05}, section=section),
    )
    shared.opts.add_option(
        "qdrift_reduce",
        shared.OptionInfo("as calibrated", "V per channel, or one pooled V per step (scalar)", gr.Radio,
                          {"choices": webui.REDUCE_CHOICES}, section=section),
    )


script_callbacks.on_ui_settings(on_ui_settings)


class QDriftPanel(scripts.Script):
    """Per-generation choice of the calibration file and strength (used by the Q-Drift samplers only)."""

    def title(self):
        return "Q-Drift"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        with gr.Accordion("Q-Drift", open=False):
            calibration = gr.Textbox(label="Calibration file (empty: the one in Settings > Q-Drift)", value="")
            # -1: the strength in Settings. A slider always has a value, and the webui hands its initial value to
            # every generation (the API's too, when no args are given): any other default would override Settings.
            strength = gr.Slider(label="Strength (-1: the one in Settings)", minimum=-1.0, maximum=5.0, step=0.05,
                                 value=webui.STRENGTH_FROM_SETTINGS)
        return [calibration, strength]

    def process(self, p, calibration="", strength=None, *args):
        if not webui.is_qdrift_sampler(getattr(p, "sampler_name", None)):
            return
        if calibration is not None and not isinstance(calibration, str):
            raise ValueError(f"Q-Drift panel: the calibration file must be a file name (a string), got {calibration!r:.80}")
        if calibration and calibration.strip():
            p.qdrift_calibration = calibration.strip()
        value = webui.panel_strength(strength)  # None: the strength in Settings; ValueError for a non-number
        if value is not None:
            p.qdrift_strength = value
        path, value, reduce = SETTINGS.for_processing(p)
        p.extra_generation_params["Q-Drift calibration"] = os.path.basename(path) if path else "(none)"
        p.extra_generation_params["Q-Drift strength"] = value
        if reduce != "as calibrated":
            p.extra_generation_params["Q-Drift reduce"] = reduce
