"""jax_msa: MiniMax Sparse Attention for JAX, as XLA FFI custom calls.

Every op takes `implementation="auto" | "kernel" | "reference"`: "auto" runs
the compiled kernel of the platform (CPU, or CUDA where ported) and falls back
to the pure-JAX reference inside the same primitive elsewhere; "kernel" fails
where no kernel exists; "reference" runs `jax_msa.reference`.
"""

from jax_msa import reference
from jax_msa._ffi import built_with_cuda
from jax_msa._partitioning import ShardingWarning
from jax_msa._primitives import NoKernelError
from jax_msa._self_check import SelfCheckWarning, self_check
from jax_msa.dense_attention import dot_product_attention
from jax_msa.indexer import block_scores, indexer, topk_select
from jax_msa.indexer_loss import indexer_kl_loss
from jax_msa.kernel_info import kernel_info
from jax_msa.msa import msa_attention
from jax_msa.paged import paged_attention, paged_indexer
from jax_msa.sparse_attention import sparse_attention
from jax_msa import context_parallel

from jax_msa._validation import BLOCK_SIZE

__all__ = [
    "BLOCK_SIZE",
    "NoKernelError",
    "ShardingWarning",
    "block_scores",
    "built_with_cuda",
    "context_parallel",
    "dot_product_attention",
    "indexer",
    "indexer_kl_loss",
    "kernel_info",
    "msa_attention",
    "paged_attention",
    "paged_indexer",
    "reference",
    "self_check",
    "SelfCheckWarning",
    "sparse_attention",
    "topk_select",
]
__version__ = "0.1.0"
