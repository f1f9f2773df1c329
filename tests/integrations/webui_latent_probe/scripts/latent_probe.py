"""Test-only webui extension for tests/integrations/test_real_hosts.py (not shipped with qdrift).

Saves each generation's sampled latents (before the VAE) to ``$QDRIFT_PROBE_DIR`` (default: the system temp
folder) and names the file in the generation info as ``Probe latent``, so the test can compare latents exactly:
images of a random-weight model hide differences below one pixel level.
"""

import itertools
import os
import tempfile

import torch

from modules import scripts

COUNTER = itertools.count()
PROBE_DIR = os.environ.get("QDRIFT_PROBE_DIR") or os.path.join(tempfile.gettempdir(), "qdrift_latent_probe")


class LatentProbe(scripts.Script):
    def title(self):
        return "latent probe"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def post_sample(self, p, ps, *args):
        os.makedirs(PROBE_DIR, exist_ok=True)
        path = os.path.join(PROBE_DIR, f"{os.getpid()}_{next(COUNTER)}.pt")
        torch.save(ps.samples.detach().cpu().clone(), path)
        p.extra_generation_params["Probe latent"] = path
