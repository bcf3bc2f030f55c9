"""The release VAE's state-dict names -> diffusers' `AutoencoderKLWan` names: the key mapping the peer tests use."""

from __future__ import annotations

import torch


def wan_vae_to_diffusers(state_dict: dict[str, torch.Tensor], num_res_blocks: int = 2) -> dict[str, torch.Tensor]:
    """Rename a `Wan2.1_VAE.pth` state dict to diffusers' `AutoencoderKLWan`
    names (tensors are shared, not copied)."""
    res = {
        "0.gamma": "norm1.gamma",
        "2.weight": "conv1.weight",
        "2.bias": "conv1.bias",
        "3.gamma": "norm2.gamma",
        "6.weight": "conv2.weight",
        "6.bias": "conv2.bias",
    }
    per_up = num_res_blocks + 2  # residual blocks + upsampler per decoder stage

    def block(rest: str) -> str:  # "residual.2.weight" / "shortcut.bias" / anything else
        if rest.startswith("residual."):
            return res[rest[len("residual.") :]]
        if rest.startswith("shortcut."):
            return "conv_shortcut." + rest[len("shortcut.") :]
        return rest

    def middle(rest: str) -> str:
        i, tail = rest.split(".", 1)
        if i == "1":
            return "attentions.0." + tail
        return f"resnets.{0 if i == '0' else 1}." + block(tail)

    def head(rest: str) -> str:
        i, tail = rest.split(".", 1)
        return ("norm_out." if i == "0" else "conv_out.") + tail

    out = {}
    for key, v in state_dict.items():
        part, _, rest = key.partition(".")
        if part in ("conv1", "conv2"):
            new = ("quant_conv." if part == "conv1" else "post_quant_conv.") + rest
        else:
            sub, _, rest = rest.partition(".")
            if sub == "conv1":
                new = "conv_in." + rest
            elif sub == "middle":
                new = "mid_block." + middle(rest)
            elif sub == "head":
                new = head(rest)
            elif sub == "downsamples":
                i, tail = rest.split(".", 1)
                new = f"down_blocks.{i}." + block(tail)
            elif sub == "upsamples":
                i, tail = rest.split(".", 1)
                stage, j = divmod(int(i), per_up)
                if j == per_up - 1:
                    new = f"up_blocks.{stage}.upsamplers.0." + tail
                else:
                    new = f"up_blocks.{stage}.resnets.{j}." + block(tail)
            else:
                raise KeyError(key)
            new = f"{part}.{new}"
        out[new] = v
    return out
