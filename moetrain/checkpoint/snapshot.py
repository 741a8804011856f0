"""In-memory snapshots with a peer replica per rank (checkpoint.snapshot_every): survive the loss of
a node without going back to the last disk checkpoint.

Every `snapshot_every` steps every rank writes its share of the training state (the checkpoint's
layout-free dict: experts by global id, DCP format) into a NODE-LOCAL directory in host memory,
`<checkpoint.snapshot_dir>/<node>/step_N/` (/dev/shm by default: tmpfs is RAM), and sends its
files to one peer rank on the next node (a ring over nodes: rank r's peer is the rank with the
same local index on the next node, in node order). Rank 0 also sends DCP's `.metadata` and the
manifest (file sizes + CRC-32s, as for disk checkpoints) to one rank of every node. After a save,
a node's directory holds its own ranks' files and the previous node's: with the files of any one
lost node still on its successor.

Recovery (`recover`, every start, a collective before the resume): every rank reports which
snapshot files its node holds; the newest step whose files the surviving nodes hold between them
(and newer than the newest disk checkpoint) is completed on every node, each missing file sent
by one holder, and resumed from like any checkpoint: verified (sizes, CRC-32s, restricted
unpickler) and resharded onto the new layout by global expert id (checkpoint/state.py).

Node identity: $MOETRAIN_NODE, else the host name (two torchrun agents on one host in the tests
set MOETRAIN_NODE). Snapshots never replace disk checkpoints: a whole-job failure loses host
memory, and checkpoint.every still writes to checkpoint.dir.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from typing import Optional

import torch
import torch.distributed as dist

from moetrain.checkpoint import state as S
from moetrain.checkpoint import store
from moetrain.checkpoint.store import CheckpointError

KEEP = 2                     # snapshots kept per node (the newest may be incomplete on a lost peer)
CHUNK = 64 * 2 ** 20         # files travel in pieces of this many bytes, through host memory


def node_id() -> str:
    return os.environ.get("MOETRAIN_NODE") or socket.gethostname()


class Snapshots:
    """checkpoint.snapshot_every > 0: save() at the step boundary, recover() at start."""

    def __init__(self, cfg, par, log=print):
        c = cfg.checkpoint
        self.every = c.snapshot_every
        self.par, self.log = par, log
        self.node = node_id()
        # per user (mode 0700: /dev/shm is world-writable), per run name, per node
        self.base = os.path.join(c.snapshot_dir, f"uid{os.getuid()}")
        self.root = os.path.join(self.base, cfg.logging.run_name, self.node)
        self.identity = run_identity(cfg)
        self.nodes: Optional[list[str]] = None      # node of every rank (all_gather at first use)
        # file transfers go through host memory on a gloo group (never a whole file on the GPU)
        self.group = par.world_group
        if par.world > 1 and par.device.type != "cpu":
            self.group = dist.new_group(backend="gloo")
        self.last_ms = 0.0
        self.last_bytes = 0

    def _prepare_root(self) -> None:
        """Node leaders: this user's private directory; leftovers of interrupted saves removed."""
        os.makedirs(self.base, mode=0o700, exist_ok=True)
        st = os.stat(self.base)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise CheckpointError(f"checkpoint.snapshot_dir: {self.base} is not a private directory of this user "
                                  f"(owner uid {st.st_uid}, mode {oct(st.st_mode & 0o777)}): choose another snapshot_dir")
        os.makedirs(self.root, exist_ok=True)
        store.remove_stale(self.root)

    def wipe(self) -> None:
        """A run that does not resume: its node-local snapshots must not be mistaken for its own."""
        if self.par.rank in self._node_leaders().values():
            shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ topology

    def _topology(self) -> list[str]:
        if self.nodes is None:
            nodes = [self.node] * self.par.world
            if self.par.world > 1:
                dist.all_gather_object(nodes, self.node, group=self.group)
            self.nodes = nodes
        return self.nodes

    def _peer(self, rank: int) -> Optional[int]:
        """The rank with the same index among its node's ranks on the next node (None on one node)."""
        nodes = self._topology()
        order = list(dict.fromkeys(nodes))
        if len(order) < 2:
            return None
        mine = [r for r in range(len(nodes)) if nodes[r] == nodes[rank]]
        nxt = [r for r in range(len(nodes)) if nodes[r] == order[(order.index(nodes[rank]) + 1) % len(order)]]
        return nxt[mine.index(rank) % len(nxt)]

    def _node_leaders(self) -> dict[str, int]:
        nodes = self._topology()
        return {n: nodes.index(n) for n in dict.fromkeys(nodes)}

    # ------------------------------------------------------------------ save

    def due(self, step: int) -> bool:
        return self.every > 0 and step > 0 and step % self.every == 0

    def save(self, trainer) -> None:
        """Collective: snapshot the state after `trainer.state.step` steps."""
        par, step = self.par, trainer.state.step
        started = time.perf_counter()
        if par.rank in self._node_leaders().values():
            self._prepare_root()
        if par.world > 1:
            dist.barrier(group=self.group)
        tmp = os.path.join(self.root, store.TMP_PREFIX + store.step_dirname(step))
        shutil.rmtree(tmp, ignore_errors=True)
        flat = S.model_entries(trainer.model, par.mesh)
        flat.update(S.optim_entries(trainer.model, trainer.opt, par.mesh))
        flat.update(S.train_entries(step, trainer.state.tokens_seen))
        flat.update(S.capture_rng(par.rank, par.device))
        store.save_dcp(flat, tmp, par.world_group if par.world > 1 else None)
        mine = sorted(f for f in os.listdir(tmp) if f.startswith(f"__{par.rank}_") and f.endswith(".distcp"))
        files = {f: (os.path.getsize(os.path.join(tmp, f)), store.file_crc32(os.path.join(tmp, f))) for f in mine}
        every = [None] * par.world
        dist.all_gather_object(every, files, group=self.group) if par.world > 1 else every.__setitem__(0, files)
        meta = None
        if par.rank == 0:
            mpath = os.path.join(tmp, store.DCP_METADATA)
            with open(mpath, "rb") as f:
                meta = f.read()
            every[0] = dict(every[0], **{store.DCP_METADATA: (len(meta), store.file_crc32(mpath))})
        sent = self._replicate(tmp, mine)
        if par.world > 1:              # every replica written before a node leader renames the directory
            dist.barrier(group=self.group)
        placement = trainer.placer.state() if getattr(trainer, "placer", None) is not None else None   # collective
        manifest = None
        if par.rank == 0:
            all_files = {k: v for d in every for k, v in d.items()}
            d = trainer.par.dims
            manifest = dict(format=store.FORMAT, format_version=store.FORMAT_VERSION, step=step, created=time.time(),
                            tokens_seen=trainer.state.tokens_seen, world=par.world,
                            layout={"dp": d.dp, "tp": d.tp, "ep": d.ep}, snapshot=True, run=self.identity,
                            expert_tensors=S.expert_tensor_names(trainer.model), buffers=S.buffer_names(trainer.model),
                            files={k: v[0] for k, v in sorted(all_files.items())},
                            crc32={k: v[1] for k, v in sorted(all_files.items())})
            if placement is not None:
                manifest["placement"] = placement
        box = [manifest, meta]
        if par.world > 1:
            dist.broadcast_object_list(box, src=0, group=self.group)
        manifest, meta = box
        if par.rank in self._node_leaders().values():       # one writer per node commits its copy
            if par.rank != 0:
                with open(os.path.join(tmp, store.DCP_METADATA), "wb") as f:
                    f.write(meta)
            with open(os.path.join(tmp, store.MANIFEST), "w") as f:
                f.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            final = os.path.join(self.root, store.step_dirname(step))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old_step, path in store.list_step_dirs(self.root)[KEEP:]:
                shutil.rmtree(path, ignore_errors=True)
        if par.world > 1:
            dist.barrier(group=self.group)
        self.last_ms = (time.perf_counter() - started) * 1e3
        self.last_bytes = sum(v[0] for v in files.values()) + sent

    def _replicate(self, tmp: str, mine: list[str]) -> int:
        """Send this rank's files to its peer, receive the files of the ranks whose peer this is.
        Returns the bytes sent."""
        par = self.par
        if par.world == 1:
            return 0
        peers = [self._peer(r) for r in range(par.world)]
        if peers[par.rank] is None:
            return 0
        sizes = [None] * par.world
        dist.all_gather_object(sizes, [(f, os.path.getsize(os.path.join(tmp, f))) for f in mine], group=self.group)
        sent = 0
        for src in range(par.world):                  # one rank's files at a time, same order everywhere
            dst = peers[src]
            if dst is None or dst == src or self.nodes[dst] == self.nodes[src]:
                continue
            for name, size in sizes[src]:
                if par.rank == src:
                    self._send_file(os.path.join(tmp, name), size, dst)
                    sent += size
                elif par.rank == dst:
                    self._recv_file(os.path.join(tmp, name), size, src)
        return sent

    def _send_file(self, path: str, size: int, dst: int) -> None:
        buf = torch.empty(min(CHUNK, max(size, 1)), dtype=torch.uint8)
        with open(path, "rb") as f:
            for lo in range(0, size, CHUNK):
                n = f.readinto(memoryview(buf.numpy())[:min(CHUNK, size - lo)])
                dist.send(buf[:n], dst, group=self.group)

    def _recv_file(self, path: str, size: int, src: int) -> None:
        buf = torch.empty(min(CHUNK, max(size, 1)), dtype=torch.uint8)
        with open(path, "wb") as f:
            for lo in range(0, size, CHUNK):
                n = min(CHUNK, size - lo)
                dist.recv(buf[:n], src, group=self.group)
                f.write(memoryview(buf.numpy())[:n])

    def remove(self) -> None:
        """After a run that ended with its final disk checkpoint: free this node's host memory."""
        if self.par.rank in self._node_leaders().values():
            shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ recovery

    def _inventory(self) -> dict:
        """{step: {"files": {name: size present here}, "manifest": its files dict}} of this node."""
        out = {}
        if not os.path.isdir(self.root):
            return out
        for step, path in store.list_step_dirs(self.root):
            try:
                manifest = store.read_manifest(path)
            except CheckpointError:
                continue
            present = {f: os.path.getsize(os.path.join(path, f)) for f in manifest["files"]
                       if os.path.isfile(os.path.join(path, f))}
            if manifest.get("run") != self.identity:       # another run's (or another config's) snapshot
                continue
            present[store.MANIFEST] = os.path.getsize(os.path.join(path, store.MANIFEST))
            out[step] = {"files": present, "want": manifest["files"], "crc32": manifest.get("crc32")}
        return out

    def recover(self, newer_than: int) -> Optional[str]:
        """Collective at start: complete the newest snapshot the surviving nodes hold between them
        (if newer than step `newer_than`) on every node; returns its path on this node, or None."""
        par = self.par
        inv = [None] * par.world
        leader = par.rank in self._node_leaders().values()
        if leader and os.path.isdir(self.root):
            store.remove_stale(self.root)
        mine = self._inventory() if leader else {}
        if par.world > 1:
            dist.all_gather_object(inv, mine, group=self.group)
        else:
            inv = [mine]
        steps = sorted({s for d in inv for s in d}, reverse=True)
        chosen = None
        for step in steps:
            if step <= newer_than:
                break
            wants = [(d[step]["want"], d[step]["crc32"]) for d in inv if step in d]
            if any(w != wants[0] for w in wants):      # two different saves of one step: trust neither
                continue
            wants = [w for w, _ in wants]
            have = {f for d in inv if step in d for f, size in d[step]["files"].items() if wants[0].get(f) == size}
            # (every holder has the manifest: it is what made the step visible)
            if set(wants[0]) <= have:
                chosen = step
                break
        if chosen is None:
            return None
        want = dict(next(d[chosen]["want"] for d in inv if chosen in d))
        holder0 = next(r for r in range(par.world) if chosen in inv[r])
        want[store.MANIFEST] = inv[holder0][chosen]["files"][store.MANIFEST]      # the manifest travels too
        leaders = self._node_leaders()
        final = os.path.join(self.root, store.step_dirname(chosen))
        if par.rank in leaders.values():
            os.makedirs(final, exist_ok=True)
        # every file a node lacks comes from the lowest rank (a node leader) that holds it
        for name, size in sorted(want.items()):
            holder = next(r for r in range(par.world) if chosen in inv[r] and inv[r][chosen]["files"].get(name) == size)
            for node, leader in leaders.items():
                if chosen in inv[leader] and inv[leader][chosen]["files"].get(name) == size:
                    continue
                if par.rank == holder:
                    self._send_file(os.path.join(final, name), size, leader)
                elif par.rank == leader:
                    self._recv_file(os.path.join(final, name), size, holder)
        if par.world > 1:
            dist.barrier(group=self.group)
        return final


def run_identity(cfg) -> str:
    """What makes a snapshot this run's: the checkpoint directory and everything that decides the
    model and the data (model, moe, data; the train keys that change the batches or the math).
    Layout, logging and checkpoint keys may differ (a restart at another world size)."""
    from moetrain.config import to_dict
    d = to_dict(cfg)
    t = d["train"]
    key = {"checkpoint_dir": os.path.realpath(cfg.checkpoint.dir), "model": d["model"], "moe": d["moe"],
           "data": {k: v for k, v in d["data"].items() if k != "cache_dir"},
           "train": {k: t[k] for k in ("seed", "global_batch_size", "seq_len", "steps", "lr", "precision")}}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
