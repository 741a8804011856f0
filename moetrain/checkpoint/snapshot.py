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

Node identity: $MOETRAIN_NODE, else the host name and boot id (two torchrun agents on one host in
the tests set MOETRAIN_NODE). Every rank must see a token its node's leader writes into the
snapshot directory (two machines given one MOETRAIN_NODE, containers with private /dev/shm given
one name do not): after the first save, else snapshots are off for the run with one warning
naming the node; at recovery, else that snapshot is not resumed. Snapshots never replace disk
checkpoints: a whole-job failure loses host memory, and checkpoint.every still writes to
checkpoint.dir.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
from typing import Optional

import torch
import torch.distributed as dist

from moetrain.checkpoint import state as S
from moetrain.checkpoint import store
from moetrain.checkpoint.lock import boot_id
from moetrain.checkpoint.store import CheckpointError
from moetrain.errors import first_line

VERIFIED = ".seen-by-leader"  # a node leader's token: its ranks see the directory it wrote or checked
KEEP = 2                     # snapshots kept per node (the newest may be incomplete on a lost peer)
CHUNK = 64 * 2 ** 20         # files travel in pieces of this many bytes, through host memory


NODE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def node_id() -> str:
    """$MOETRAIN_NODE, else host name + boot id: two machines that share a host name (cloned
    images, containers) are still two nodes, and a node's directory changes only with a reboot,
    which empties tmpfs anyway."""
    name = os.environ.get("MOETRAIN_NODE")
    if name:
        return name
    boot = boot_id()[:8]
    return f"{socket.gethostname()}-{boot}" if boot else socket.gethostname()


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
        self.shared_checked = False     # every rank saw its node leader's token in a committed snapshot

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
        """The node of every rank (collective at first use); a node name unfit for a directory
        name raises the same CheckpointError on every rank."""
        if self.nodes is None:
            nodes = [self.node] * self.par.world
            if self.par.world > 1:
                dist.all_gather_object(nodes, self.node, group=self.group)
            bad = next((r for r, n in enumerate(nodes) if not isinstance(n, str) or not NODE_NAME.fullmatch(n)), None)
            if bad is not None:
                raise CheckpointError(f"rank {bad}'s node name {str(nodes[bad])[:80]!r} ($MOETRAIN_NODE, else the host "
                                      "name) is not usable as a directory name: use letters, digits, '.', '_', '-'")
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

    def save(self, trainer) -> bool:
        """Collective: snapshot the state after `trainer.state.step` steps; True when committed. A
        snapshot that cannot be written (host memory full, an unusable snapshot_dir) is skipped on
        every rank with one warning line (False), and training goes on (disk checkpoints are
        unaffected)."""
        par, step = self.par, trainer.state.step
        started = time.perf_counter()
        leader = par.rank in self._node_leaders().values()
        tmp = os.path.join(self.root, store.TMP_PREFIX + store.step_dirname(step))
        why = None
        if leader:
            try:
                self._prepare_root()
                shutil.rmtree(tmp, ignore_errors=True)
            except (OSError, CheckpointError) as exc:
                why = first_line(exc)
        why = self._agree(why)
        if why:
            return self._skip(step, why, tmp)
        flat = S.save_entries(trainer, par)
        try:
            store.save_dcp(flat, tmp, par.world_group if par.world > 1 else None)   # raises on every rank alike
        except CheckpointError as exc:
            return self._skip(step, str(exc), tmp)
        files, meta, why = {}, None, None
        try:
            mine = sorted(f for f in os.listdir(tmp) if f.startswith(f"__{par.rank}_") and f.endswith(".distcp"))
            files = {f: (os.path.getsize(os.path.join(tmp, f)), store.file_crc32(os.path.join(tmp, f))) for f in mine}
            if par.rank == 0:
                mpath = os.path.join(tmp, store.DCP_METADATA)
                with open(mpath, "rb") as f:
                    meta = f.read()
                files[store.DCP_METADATA] = (len(meta), store.file_crc32(mpath))
        except OSError as exc:
            why, files = first_line(exc), {}
        every = [files] * par.world
        if par.world > 1:
            dist.all_gather_object(every, files, group=self.group)
        sent, replica_error = self._replicate(tmp, [f for f in files if f != store.DCP_METADATA])
        why = self._agree(why or replica_error)     # also: every replica written before a leader renames
        if why:
            return self._skip(step, why, tmp)
        fields = S.manifest_fields(trainer, par)        # collective (the placement)
        manifest = None
        if par.rank == 0:
            all_files = {k: v for d in every for k, v in d.items()}
            manifest = dict(format=store.FORMAT, format_version=store.FORMAT_VERSION, step=step, created=time.time(),
                            snapshot=True, run=self.identity, **fields,
                            files={k: v[0] for k, v in sorted(all_files.items())},
                            crc32={k: v[1] for k, v in sorted(all_files.items())})
        box = [manifest, meta]
        if par.world > 1:
            dist.broadcast_object_list(box, src=0, group=self.group)
        manifest, meta = box
        final = os.path.join(self.root, store.step_dirname(step))
        if leader:                      # one writer per node commits its copy
            try:
                if par.rank != 0:
                    with open(os.path.join(tmp, store.DCP_METADATA), "wb") as f:
                        f.write(meta)
                with open(os.path.join(tmp, store.MANIFEST), "w") as f:
                    f.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                self._prune(step)
            except OSError as exc:
                why = first_line(exc)
        why = self._agree(why)
        if not why and not self.shared_checked:     # once per run: does every rank see its node's copy?
            why = self._agree(self._same_copy(final))
            self.shared_checked = not why
            if why:                     # it would fail alike every time: snapshots off for this run
                self.every = 0
                why = "snapshots are off for this run: " + why
        if why:                         # a node without its copy: no node keeps this step
            if leader:
                shutil.rmtree(final, ignore_errors=True)
            return self._skip(step, why, tmp)
        self.last_ms = (time.perf_counter() - started) * 1e3
        self.last_bytes = sum(v[0] for v in files.values()) + sent
        return True

    def _prune(self, step: int) -> None:
        """Node leaders: keep the KEEP newest snapshots up to `step`; any newer one belongs to a
        timeline this run left (a recovery that fell back past it) or to another config's run."""
        kept = 0
        for s, path in store.list_step_dirs(self.root):
            if s > step or kept >= KEEP:
                shutil.rmtree(path, ignore_errors=True)
            else:
                kept += 1

    def _agree(self, why: Optional[str]) -> Optional[str]:
        """Every rank: the first rank's error (or None), so all ranks take the same branch."""
        if self.par.world == 1:
            return why
        every = [None] * self.par.world
        dist.all_gather_object(every, why, group=self.group)
        return next((w for w in every if w), None)

    def _skip(self, step: int, why: str, tmp: str) -> bool:
        # every rank (a rank whose node name is shared with another machine wrote into its own memory)
        shutil.rmtree(tmp, ignore_errors=True)
        self.log(f"warning: in-memory snapshot of step {step} skipped ({why[:300]}); training goes on")
        self.last_ms, self.last_bytes = 0.0, 0
        return False

    def _replicate(self, tmp: str, mine: list[str]) -> tuple[int, Optional[str]]:
        """Send this rank's files to its peer, receive the files of the ranks whose peer this is.
        Returns (bytes sent, this rank's error or None): a failed read or write still sends or
        drains every chunk, so the ranks stay in step."""
        par = self.par
        if par.world == 1:
            return 0, None
        peers = [self._peer(r) for r in range(par.world)]
        if peers[par.rank] is None:
            return 0, None
        sizes = [None] * par.world
        dist.all_gather_object(sizes, [(f, os.path.getsize(os.path.join(tmp, f))) for f in mine], group=self.group)
        sent, why = 0, None
        for src in range(par.world):                  # one rank's files at a time, same order everywhere
            dst = peers[src]
            if dst is None or dst == src or self.nodes[dst] == self.nodes[src]:
                continue
            for name, size in sizes[src]:
                if par.rank == src:
                    why = self._send_file(os.path.join(tmp, name), size, dst) or why
                    sent += size
                elif par.rank == dst:
                    why = self._recv_file(os.path.join(tmp, name), size, src) or why
        return sent, why

    def _send_file(self, path: str, size: int, dst: int) -> Optional[str]:
        return self._transfer(path, size, dst, send=True)

    def _recv_file(self, path: str, size: int, src: int) -> Optional[str]:
        return self._transfer(path, size, src, send=False)

    def _transfer(self, path: str, size: int, peer: int, send: bool) -> Optional[str]:
        """Send the file at `path` to `peer`, or receive it from `peer` into `path`, in CHUNK
        pieces through host memory. Returns this rank's error or None: a failed open, read or write
        (e.g. tmpfs full) still moves every chunk, so both ranks stay in step."""
        buf = torch.zeros(min(CHUNK, max(size, 1)), dtype=torch.uint8)
        why = None
        try:
            f = open(path, "rb" if send else "wb")
        except OSError as exc:
            f, why = None, first_line(exc)
        try:
            for lo in range(0, size, CHUNK):
                piece = buf[:min(CHUNK, size - lo)]
                if not send:
                    dist.recv(piece, peer, group=self.group)
                if f is not None and why is None:
                    try:
                        (f.readinto if send else f.write)(memoryview(piece.numpy()))
                    except OSError as exc:
                        why = first_line(exc)
                if send:
                    dist.send(piece, peer, group=self.group)
        finally:
            if f is not None:
                try:
                    f.close()
                except OSError as exc:
                    why = why or first_line(exc)
        return why

    def remove(self) -> None:
        """After a run that ended with its final disk checkpoint: free this node's host memory."""
        if self.par.rank in self._node_leaders().values():
            shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ recovery

    def _inventory(self) -> dict:
        """{step: {"files": {name: size present here}, "want": the manifest's files, "crc32": its
        CRC-32s}} of this node's snapshots that carry this run's identity."""
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
        """Collective at start: the newest snapshot the surviving nodes hold between them (if newer
        than step `newer_than`), completed on every node and verified there by the node's leader
        (sizes and CRC-32 of every file); returns its path on this node, or None. A snapshot that
        cannot be completed or fails verification on any node is dropped with one warning and the
        next older one is tried; the disk checkpoint (already loaded) is the last resort."""
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
        for step in self._complete_steps(inv, newer_than):
            final = os.path.join(self.root, store.step_dirname(step))
            why = self._complete(inv, step, final)
            if why is None and leader:
                try:
                    store.verify(final, contents=True)
                except CheckpointError as exc:     # a corrupt copy: never chosen again
                    why = first_line(exc)
                    shutil.rmtree(final, ignore_errors=True)
            why = self._agree(why) or self._agree(self._same_copy(final))
            if not why:
                if leader:      # newer snapshots belong to a timeline this run leaves now
                    self._prune(step)
                return final
            self.log(f"warning: the in-memory snapshot of step {step} could not be completed or verified on every "
                     f"node ({why[:300]}): trying an older snapshot, else the disk checkpoint")
        return None

    def _same_copy(self, final: str) -> Optional[str]:
        """Collective: every rank sees the snapshot directory its node leader wrote or verified (a
        random token the leader writes into it), not a same-named directory on another machine
        (two machines given one MOETRAIN_NODE, containers with private /dev/shm). This rank's error."""
        par = self.par
        leader = self._node_leaders()[self.node]
        token = os.urandom(8).hex() if par.rank == leader else None
        why = None
        if token is not None:
            try:
                with open(os.path.join(final, VERIFIED), "w") as f:
                    f.write(token)
            except OSError as exc:
                why = first_line(exc)
        tokens = [token] * par.world
        if par.world > 1:
            dist.all_gather_object(tokens, token, group=self.group)
        if why is None and par.rank != leader:
            try:
                with open(os.path.join(final, VERIFIED)) as f:
                    seen = f.read()
            except OSError:
                seen = None
            if seen != tokens[leader]:
                why = (f"rank {par.rank} does not see the snapshot its node's first rank wrote under node name "
                       f"{self.node!r}: two machines (or containers with private /dev/shm) share that name; set "
                       "MOETRAIN_NODE to one distinct name per machine")
        return why

    @staticmethod
    def _complete_steps(inv: list, newer_than: int) -> list[int]:
        """Steps newer than `newer_than`, newest first, whose files the nodes hold between them
        (every holder agreeing on the manifest's files and CRC-32s)."""
        out = []
        for step in sorted({s for d in inv for s in d}, reverse=True):
            if step <= newer_than:
                break
            wants = [(d[step]["want"], d[step]["crc32"]) for d in inv if step in d]
            if any(w != wants[0] for w in wants):      # two different saves of one step: trust neither
                continue
            want = wants[0][0]
            have = {f for d in inv if step in d for f, size in d[step]["files"].items() if want.get(f) == size}
            # (every holder has the manifest: it is what made the step visible)
            if set(want) <= have:
                out.append(step)
        return out

    def _complete(self, inv: list, step: int, final: str) -> Optional[str]:
        """Collective: every file of snapshot `step` that a node lacks comes from the lowest rank
        (a node leader) that holds it. Returns this rank's error or None."""
        par = self.par
        want = dict(next(d[step]["want"] for d in inv if step in d))
        holder0 = next(r for r in range(par.world) if step in inv[r])
        want[store.MANIFEST] = inv[holder0][step]["files"][store.MANIFEST]      # the manifest travels too
        leaders = self._node_leaders()
        why = None
        if par.rank in leaders.values():
            try:
                os.makedirs(final, exist_ok=True)
            except OSError as exc:
                why = first_line(exc)
        for name, size in sorted(want.items()):
            holder = next(r for r in range(par.world) if step in inv[r] and inv[r][step]["files"].get(name) == size)
            for node, leader in leaders.items():
                if step in inv[leader] and inv[leader][step]["files"].get(name) == size:
                    continue
                if par.rank == holder:
                    why = self._send_file(os.path.join(final, name), size, leader) or why
                elif par.rank == leader:
                    why = self._recv_file(os.path.join(final, name), size, holder) or why
        return why


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
