"""What is optimised: the hash-grid encoding (torch or tinycudann backend) and the NeRF field.

- :class:`HashGridEncoding` — pure-torch multiresolution hash encoding, tinycudann's semantics.
- :class:`TcnnHashGridEncoding` — the same through tinycudann's CUDA kernels, when installed.
- :func:`make_hash_encoding` — the one place the backend is chosen (and logged).
- :class:`NeRFField` — density (with the blob initialisation) and albedo, normals for shading.
"""

from carv3d.scene.field import NeRFField, blob_bias, trunc_exp
from carv3d.scene.hashgrid import HashGridEncoding, TcnnHashGridEncoding, make_hash_encoding
from carv3d.scene.layout import GridLevel, grid_levels

__all__ = [
    "GridLevel",
    "HashGridEncoding",
    "NeRFField",
    "TcnnHashGridEncoding",
    "blob_bias",
    "grid_levels",
    "make_hash_encoding",
    "trunc_exp",
]
