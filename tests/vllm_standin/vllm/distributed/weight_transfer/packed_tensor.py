"""Import target of TRL's vLLM client; server-mode NCCL weight transfer is not part of the stand-in."""


def packed_nccl_broadcast_producer(*args, **kwargs):
    raise NotImplementedError("vLLM stand-in: server-mode NCCL weight transfer is not supported (use colocate).")
