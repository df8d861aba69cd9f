"""IP-Adapter's image projection and its public weight format (MIND-Edit §3.4 "Visual Representation Decoding").

    v_insight (or CLIP_image(I)): B×D ──Linear(D → N·C)──► B×N×C ──LayerNorm(C)──► f_img (N = 4, C = UNet
    cross-attention width), read by the decoupled cross-attention (decoupled_attention.DecoupledAttnProcessor).

The projection is diffusers' own `ImageProjection` (parameters `image_embeds.*`, `norm.*`). The public IP-Adapter
file (`ip-adapter_sd15.bin`, what diffusers' `load_ip_adapter` reads) is one dict

    {"image_proj": {"proj.weight", "proj.bias", "norm.weight", "norm.bias"},
     "ip_adapter": {"1.to_k_ip.weight", "1.to_v_ip.weight", "3.to_k_ip.weight", ...}}

where the cross-attention (attn2) layers are numbered 1, 3, 5, ... in `unet.attn_processors` order (diffusers
0.42, `UNet2DConditionLoadersMixin._convert_ip_adapter_attn_to_diffusers`; the odd numbers are the original
repository's numbering of attn1/attn2 pairs). The public format fixes N = 4 (diffusers assumes it).
`ip_adapter_state_dict` writes ours in that format, `load_ip_adapter_state_dict` reads one into ours, so a public
SD1.5 IP-Adapter can initialise the generation module and ours can be used with diffusers' pipelines.
"""
import torch
from diffusers.models.embeddings import ImageProjection

from .decoupled_attention import decoupled_processors


def image_projection(embed_dim: int, cross_dim: int, num_tokens: int = 4) -> ImageProjection:
    """IP-Adapter's projection: B×embed_dim -> B×num_tokens×cross_dim (Linear + LayerNorm)."""
    return ImageProjection(image_embed_dim=embed_dim, cross_attention_dim=cross_dim, num_image_text_embeds=num_tokens)


def ip_adapter_state_dict(unet, proj: ImageProjection) -> dict:
    """Our image projection and decoupled-attention weights in the public IP-Adapter layout (tensors detached)."""
    image_proj = {k.replace("image_embeds.", "proj.", 1): v.detach() for k, v in proj.state_dict().items()}
    ip = {}
    for i, p in enumerate(decoupled_processors(unet).values()):
        ip[f"{2 * i + 1}.to_k_ip.weight"] = p.to_k_ip.weight.detach()
        ip[f"{2 * i + 1}.to_v_ip.weight"] = p.to_v_ip.weight.detach()
    return {"image_proj": image_proj, "ip_adapter": ip}


@torch.no_grad()
def load_ip_adapter_state_dict(unet, proj: ImageProjection, sd: dict) -> None:
    """Copy a public-layout IP-Adapter dict into our projection and decoupled processors (shapes must match)."""
    if set(sd) != {"image_proj", "ip_adapter"}:
        raise ValueError(f"an IP-Adapter state dict has keys image_proj and ip_adapter, got {sorted(sd)}")
    proj.load_state_dict({k.replace("proj.", "image_embeds.", 1): v for k, v in sd["image_proj"].items()})
    procs = list(decoupled_processors(unet).values())
    expected = {f"{2 * i + 1}.to_{kv}_ip.weight" for i in range(len(procs)) for kv in "kv"}
    if set(sd["ip_adapter"]) != expected:
        raise ValueError(f"ip_adapter holds {len(sd['ip_adapter'])} weights, this UNet's {len(procs)} "
                         "cross-attention layers need " + str(len(expected)))
    for i, p in enumerate(procs):
        p.to_k_ip.weight.copy_(sd["ip_adapter"][f"{2 * i + 1}.to_k_ip.weight"])
        p.to_v_ip.weight.copy_(sd["ip_adapter"][f"{2 * i + 1}.to_v_ip.weight"])


def save_ip_adapter(unet, proj: ImageProjection, path: str) -> str:
    """Write `ip_adapter_state_dict` to `path` (.safetensors: flat "image_proj.*"/"ip_adapter.*" keys, as the
    public safetensors files; otherwise torch.save of the nested dict, as the public .bin)."""
    sd = ip_adapter_state_dict(unet, proj)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({f"{top}.{k}": v.contiguous() for top, d in sd.items() for k, v in d.items()}, path)
    else:
        torch.save(sd, path)
    return path


def load_ip_adapter(unet, proj: ImageProjection, path: str) -> None:
    """Read a file written by `save_ip_adapter` (or a public IP-Adapter file) into ours."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        flat = load_file(path)
        sd = {"image_proj": {}, "ip_adapter": {}}
        for k, v in flat.items():
            top, _, rest = k.partition(".")
            sd.setdefault(top, {})[rest] = v
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    load_ip_adapter_state_dict(unet, proj, sd)
