"""The interleaved 1F1B schedule's order, run for P ranks in one process over a simulated ring.

Each rank runs the real `interleaved_one_f_one_b` in a thread. The simulated network is stricter
than gloo or NCCL: a send completes only when its receive is posted (no buffering), and sends
and receives between two ranks pair up in posting order whatever their tags (as NCCL does), the
tags then having to agree. Every forward and backward checks that what it received came from
the right chunk, for the right micro-batch.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch

from trainer.parallel.schedule import (
    InterleavedOrder,
    bubble_fraction,
    interleaved_forward_only,
    interleaved_one_f_one_b,
)


class Deadlock(RuntimeError):
    pass


class Batch:
    def __init__(self, owner: int, ops: int) -> None:
        self.owner, self.remaining = owner, ops


class Ring:
    """P ranks' `RingLink.communicate` with rendezvous semantics and deadlock detection."""

    def __init__(self, ranks: int) -> None:
        self.ranks = ranks
        self.cond = threading.Condition()
        self.sends: dict[tuple[int, int], list] = {}  # (src, dst) -> [(payload, tag, batch)]
        self.recvs: dict[tuple[int, int], list] = {}  # (src, dst) -> [(slot, tag, batch)]
        self.alive = ranks
        self.blocked: set[int] = set()
        self.deadlock = False
        self.errors: list[str] = []

    def link(self, rank: int) -> RankLink:
        return RankLink(self, rank)

    def _match(self, key: tuple[int, int]) -> None:
        sends, recvs = self.sends.get(key, []), self.recvs.get(key, [])
        while sends and recvs:
            (payload, send_tag, sb), (slot, recv_tag, rb) = sends.pop(0), recvs.pop(0)
            if send_tag != recv_tag:
                self.errors.append(f"{key}: sent with tag {send_tag}, received as {recv_tag}")
            slot.append(payload)
            for batch in (sb, rb):
                batch.remaining -= 1
                if batch.remaining == 0:
                    self.blocked.discard(batch.owner)

    def post(self, rank: int, sends: list, recvs: list) -> None:
        """sends: [(dst, payload, tag)]; recvs: [(src, slot, tag)]; returns when all matched."""
        with self.cond:
            batch = Batch(rank, len(sends) + len(recvs))
            if batch.remaining == 0:
                return
            keys = set()
            for dst, payload, tag in sends:
                self.sends.setdefault((rank, dst), []).append((payload, tag, batch))
                keys.add((rank, dst))
            for src, slot, tag in recvs:
                self.recvs.setdefault((src, rank), []).append((slot, tag, batch))
                keys.add((src, rank))
            if batch.remaining:
                self.blocked.add(rank)
            for key in keys:
                self._match(key)
            self.cond.notify_all()
            while batch.remaining and not self.deadlock:
                if len(self.blocked) == self.alive:
                    self.deadlock = True
                    self.cond.notify_all()
                    break
                self.cond.wait()
            if self.deadlock:
                raise Deadlock(f"rank {rank} waits forever")

    def finished(self) -> None:
        with self.cond:
            self.alive -= 1
            if self.alive and len(self.blocked) == self.alive:
                self.deadlock = True
            self.cond.notify_all()


class RankLink:
    def __init__(self, ring: Ring, rank: int) -> None:
        self.ring, self.rank = ring, rank
        self.prev, self.next = (rank - 1) % ring.ranks, (rank + 1) % ring.ranks

    def communicate(
        self, shapes, send_forward=None, recv_forward=None, send_backward=None,
        recv_backward=None, what="",
    ):  # fmt: skip
        sends, recvs, got_state, got_grads = [], [], [], []
        if send_forward is not None:
            sends.append((self.next, send_forward[0], send_forward[1]))
        if send_backward is not None:
            sends.append((self.prev, send_backward[0], send_backward[1]))
        if recv_forward is not None:
            recvs.append((self.prev, got_state, recv_forward))
        if recv_backward is not None:
            recvs.append((self.next, got_grads, recv_backward))
        self.ring.post(self.rank, sends, recvs)
        return (got_state[0] if got_state else None), (got_grads[0] if got_grads else None)


def tensor(virtual_stage: int, mb: int) -> dict[str, torch.Tensor]:
    return {"x": torch.tensor([virtual_stage, mb])}


def run_ranks(stages: int, work) -> None:
    """Run ``work(rank, link)`` on every rank in its own thread; fail on deadlock or error."""
    ring = Ring(stages)
    failures: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            work(rank, ring.link(rank))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)
        finally:
            ring.finished()

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(stages)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank never finished"
    assert not ring.errors, ring.errors
    assert not failures, failures


CASES = [(2, 2, 2), (2, 2, 4), (2, 3, 6), (3, 2, 3), (3, 2, 6), (4, 2, 8), (4, 3, 4), (2, 4, 8)]


@pytest.mark.parametrize("stages,chunks,m", CASES, ids=lambda v: str(v))
def test_interleaved_1f1b_pairs_every_transfer_and_bounds_activations(stages, chunks, m):
    last_virtual = stages * chunks - 1
    log: dict[int, list] = {r: [] for r in range(stages)}
    peak: dict[int, int] = {}

    def work(rank: int, link) -> None:
        live = 0

        def forward(c, mb, received):
            nonlocal live
            vs = c * stages + rank
            if vs == 0:
                assert received is None
            else:  # the previous chunk's output for this micro-batch
                assert received["x"].tolist() == [vs - 1, mb], (rank, c, mb, received)
            live += 1
            peak[rank] = max(peak.get(rank, 0), live)
            log[rank].append(("F", c, mb))
            return tensor(vs, mb), vs

        def backward(c, mb, output, output_grads, vs):
            nonlocal live
            assert output["x"].tolist() == [vs, mb]
            if vs == last_virtual:
                assert output_grads is None
            else:  # the next chunk's gradient for this micro-batch
                assert output_grads["x"].tolist() == [vs + 1, mb], (rank, c, mb, output_grads)
            live -= 1
            log[rank].append(("B", c, mb))
            return None if vs == 0 else tensor(vs, mb)

        interleaved_one_f_one_b(m, rank, stages, chunks, link, {}, forward, backward)

    run_ranks(stages, work)
    order = InterleavedOrder(stages, chunks, m)
    every = {(kind, c, mb) for kind in "FB" for c in range(chunks) for mb in range(m)}
    for rank, ops in log.items():
        assert Counter(ops) == Counter(every), f"rank {rank}: not one F and one B each"
        # Megatron's bound: the warm-up forwards plus the one of the 1F1B step.
        assert peak[rank] == min(order.warmup(rank) + 1, order.total), (rank, peak)
    # The first rank's last backward is the embedding's chunk on the last micro-batch (the
    # tied-embedding gradient is added there).
    assert log[0][-1] == ("B", 0, m - 1)


@pytest.mark.parametrize("stages,chunks,m", [(2, 2, 3), (3, 2, 4), (4, 3, 2)], ids=str)
def test_interleaved_forward_only_takes_any_number_of_micro_batches(stages, chunks, m):
    outputs: dict[int, list] = {}

    def work(rank: int, link) -> None:
        def forward(c, mb, received):
            vs = c * stages + rank
            if vs:
                assert received["x"].tolist() == [vs - 1, mb]
            return tensor(vs, mb)

        outputs[rank] = interleaved_forward_only(
            m, rank, stages, chunks, link, lambda mb: {}, forward
        )

    run_ranks(stages, work)
    last = stages * chunks - 1
    assert [o["x"].tolist() for o in outputs[stages - 1]] == [[last, mb] for mb in range(m)]
    assert all(outputs[r] == [] for r in range(stages - 1))


def test_the_simulated_ring_detects_a_deadlock():
    """Two ranks that both receive first never finish: the harness must say so."""

    def work(rank: int, link) -> None:
        link.communicate({}, recv_forward=1)

    with pytest.raises(AssertionError, match="Deadlock"):
        run_ranks(2, work)


def test_megatron_order_of_chunks_and_micro_batches():
    order = InterleavedOrder(stages=2, chunks=2, micro_batches=4)
    forwards = [(order.chunk(k), order.micro_batch(k)) for k in range(order.total)]
    assert forwards == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    assert [order.chunk(k, forward=False) for k in range(4)] == [1, 1, 0, 0]
    assert [order.warmup(s) for s in (0, 1)] == [4, 2]
    assert InterleavedOrder(2, 2, 2).warmup(1) == 4  # m = P: every forward first


def test_bubble_fraction_follows_the_formula():
    # (P - 1) / (v m + P - 1): 1F1B's and interleaving's share of the step spent idle.
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction(4, 8, 2) == pytest.approx(3 / 19)
    assert bubble_fraction(2, 4, 2) == pytest.approx(1 / 9)
    assert bubble_fraction(1, 8, 1) == 0.0
    # Its ratio to the compute time is Megatron's (P - 1) / (v m).
    f = bubble_fraction(8, 16, 4)
    assert f / (1 - f) == pytest.approx(7 / 64)
