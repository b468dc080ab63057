"""Stage 3: mesh decoder (sparse transformer + subdivision) and mesh extraction, then posing."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..mesh import Mesh
from ..model.configs import ModelConfig
from ..model.mesh_decoder import MeshDecoder
from ..model.mesh_extract import extract_mesh
from ..model.sparse import SparseTensor
from ..preprocess import PreparedInputs
from ..seams import SparseTokens, TokenTransform, TransformContext, TransformState
from .options import RunOptions
from .types import DecodeOutput, SLaTOutput, SSOutput


class DecodeStage(nn.Module):
    """Decode the structured latent to a mesh in the object frame and place it with the layout."""

    name = "decode"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.decoder = MeshDecoder(cfg.mesh_decoder)

    @torch.no_grad()
    def forward(self, inputs: PreparedInputs, ss: SSOutput, slat: SLaTOutput, *,
                options: RunOptions | None = None, decoder_transform: TokenTransform | None = None,
                coords_transform: TokenTransform | None = None) -> DecodeOutput:
        network = self.run_network(inputs, ss, slat, options=options, decoder_transform=decoder_transform)
        return self.extract(network, ss, slat, decoder_transform=decoder_transform, coords_transform=coords_transform)

    @torch.no_grad()
    def run_network(self, inputs: PreparedInputs, ss: SSOutput, slat: SLaTOutput, *,
                    options: RunOptions | None = None, decoder_transform: TokenTransform | None = None
                    ) -> "DecodedNetwork":
        """The mesh decoder network (on the decoder's device) and the token transform before it; :meth:`extract`
        does the rest on the host. Split so that a stream of objects can extract one object's mesh while the GPU
        works on the next (``fs3d_accel.stream``)."""
        options = options or RunOptions()
        device = next(self.decoder.parameters()).device
        tokens = SparseTokens(coords=slat.coords.to(device), resolution=slat.resolution, feats=slat.slat.to(device))
        state = TransformState()
        if decoder_transform is not None:
            tokens, state = decoder_transform.reduce(
                tokens, TransformContext(mask=inputs.mask_full, occupancy_logits=ss.occupancy_logits,
                                 info={"image": inputs.image_full}))
        dtype = options.compute_dtype(device)
        with options.network_context(device, "decode"):
            out = self.decoder(tokens.feats.to(dtype), tokens.coords.to(torch.int32))
        return DecodedNetwork(out=out, num_tokens=len(tokens), state=state)

    @torch.no_grad()
    def extract(self, network: "DecodedNetwork", ss: SSOutput, slat: SLaTOutput, *,
                decoder_transform: TokenTransform | None = None,
                coords_transform: TokenTransform | None = None) -> DecodeOutput:
        """Mesh extraction from the decoder output (marching cubes on the host; the output is copied there first if it
        is on a GPU), the transforms' vertex restores and the layout's pose."""
        v, f, colors = extract_mesh(network.out, self.cfg.mesh_decoder.output_resolution)[0]
        verts = torch.as_tensor(np.asarray(v), dtype=torch.float32)
        if decoder_transform is not None:
            verts = decoder_transform.restore_vertices(verts, network.state)
        if coords_transform is not None:
            verts = coords_transform.restore_vertices(verts, slat.coords_state)
        mesh = Mesh(verts.cpu().numpy(), np.asarray(f),
                    None if colors is None else (np.clip(np.asarray(colors), 0, 1) * 255).astype(np.uint8))
        return DecodeOutput(mesh=mesh, posed_mesh=mesh.transformed(ss.layout), num_tokens=network.num_tokens,
                            decoder_state=network.state)


@dataclass
class DecodedNetwork:
    """The mesh decoder network's output for one object (:meth:`DecodeStage.run_network`)."""

    out: SparseTensor
    num_tokens: int
    state: TransformState
