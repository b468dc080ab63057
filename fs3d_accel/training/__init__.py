"""Training of the ``mini`` model (sam3d-mini): encoders, losses, data packing, stage trainers.

Inference never imports this package. Everything that runs on the GPU machine needs only torch,
numpy and safetensors; the data *builder* (``build_data``) additionally needs trimesh,
point-cloud-utils and ``fs3d_analysis.data`` (renderer, shape sources) and runs on the CPU host.
"""
