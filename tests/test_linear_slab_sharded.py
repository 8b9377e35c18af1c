"""The slab schedule under the vocabulary-sharded form (``forms/sharded.py`` around the linear form):
each rank's backward runs slab by slab over its own shard of the weight rows, with the shard's local
token ids, for the policy loss, the OPSD losses and the log-probs. Spawned gloo ranks on CPU, as
``test_distributed.py`` runs them, with its checks: the sharded loss, metrics and gradient slices
equal the unsharded ones (both on the slab schedule, which ``test_linear_slab.py`` holds to the
float64 reference)."""

from mp_harness import finish_rank, spawn, start_rank

SLAB_SIZE = 8  # against shards of 17 and 20 ids: slabs of 8, 8, 1 and 8, 8, 4


def test_sharded_linear_losses_on_slabs(tmp_path):
    spawn(_worker, 2, tmp_path)


def _worker(rank, world, init):
    start_rank(rank, world, init)
    import torch.distributed as dist
    from test_distributed import BLOCK, LOSS_AGGS, SPLITS, TRITON_AGGS, Run

    from rlsd_kernels.forms import linear, slab
    from rlsd_kernels.launch import common as _utils
    from rlsd_kernels.launch.tuning import RowConfig, force_row_config

    linear.SCHEDULE, slab.SLAB_SIZE = "slab", SLAB_SIZE
    calls = []
    real = slab.Slabs.gradient

    def counted(self, h, tokens, fn, dz, t=None):
        calls.append(len(self.bounds))
        return real(self, h, tokens, fn, dz, t)

    slab.Slabs.gradient = counted
    run = Run(rank, world, dist.group.WORLD, SPLITS[world])
    with force_row_config(RowConfig(BLOCK, 1)):
        for backend, aggs in (("torch", LOSS_AGGS), ("triton", TRITON_AGGS)):
            with _utils.backend(backend):
                run.linear_losses(aggs)
                run.opsd_linear_losses(aggs)
                run.logprobs()
    # Every rank's backward ran on its shard's slabs (the unsharded oracle on the whole vocabulary's).
    shard_slabs = -(-SPLITS[world][rank] // SLAB_SIZE)
    assert shard_slabs in calls and -(-sum(SPLITS[world]) // SLAB_SIZE) in calls
    finish_rank()
