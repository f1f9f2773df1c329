"""'Q-Drift calibrate': measure a calibration inside the webui, in two passes (Scripts dropdown, txt2img).

Pass 1 with the full-precision checkpoint records the Euler trajectory; pass 2 with the quantized checkpoint
(e.g. an NF4/GGUF load in Forge) evaluates it on the recorded states, optionally generates once more (two quantized
runs per image) to size the output correction and the drift, and writes the calibration file.
K = batch count x batch size. See the "Host integrations" section of the qdrift README.
"""

import gradio as gr

from modules import processing, scripts, sd_samplers, shared
from modules.sd_samplers_kdiffusion import KDiffusionSampler

from qdrift.hosts import webui

try:
    from modules import paths

    MODELS_DIR = paths.models_path
except (ImportError, AttributeError):
    MODELS_DIR = None


class QDriftCalibrateScript(scripts.Script):
    def title(self):
        return "Q-Drift calibrate"

    def show(self, is_img2img):
        return not is_img2img

    def ui(self, is_img2img):
        gr.Markdown(
            "Pass 1: load the **full-precision** checkpoint and Generate. Pass 2: load the **quantized** checkpoint, "
            "select pass 2 and Generate again (seeds and settings of pass 1 are reused). "
            "K = batch count x batch size; Hires. fix must be off."
        )
        phase = gr.Radio(webui.PHASES, value=webui.PHASES[0], label="Pass")
        trace = gr.Textbox(value="trace.safetensors", label="Trace file (written by pass 1, read by pass 2; relative to models/qdrift)")
        out = gr.Textbox(value="calibration.safetensors", label="Calibration file to write in pass 2 (relative to models/qdrift)")
        reduce = gr.Radio(["channel", "scalar"], value="channel", label="V per channel, or pooled per step (scalar)")
        size = gr.Checkbox(value=True, label="Pass 2: size the correction to what the quantized sampler accumulates "
                                             "(one more generation with the quantized checkpoint, two runs per image; "
                                             "skipped on flow models such as SD3 and FLUX, where it measured worse)")
        bands = gr.Radio([1, 2, 4], value=webui.HOST_BANDS,
                         label="Pass 2: frequency bands per channel (4: v2 also removes fine-grained speckle that one "
                               "value per channel cannot locate)")
        return [phase, trace, out, reduce, size, bands]

    def run(self, p, phase, trace_path, out_path, reduce, size_drift=True, bands=webui.HOST_BANDS):
        checkpoint = getattr(shared.opts, "sd_model_checkpoint", None)
        return webui.run_calibration_pass(
            p, phase, trace_path, out_path, reduce,
            process_images=processing.process_images, sd_samplers=sd_samplers, KDiffusionSampler=KDiffusionSampler,
            models_dir=MODELS_DIR, checkpoint=checkpoint, size_drift="auto" if size_drift else False,
            bands=bands,
        )
