"""What the layers of one expert-parallel group share on this process, kept in one visible place.

A layer is given a `torch.distributed` process group, and torch's process groups cannot carry anything
of ours; yet the layers of one group must share four things across their forwards:

- the count of layers built on the group: each layer's index, agreed by the ranks when it is built (the
  build handshake), which every forward's header carries so that ranks calling different layers of the
  same shape are told apart;
- the group's forward count: every forward's number, the same on every rank whatever layer it runs, so a
  rank that skipped a forward is caught and, after a mismatch, every rank agrees on the next number;
- the symmetric-memory workspaces on the group (`epmoe.SymmWorkspace`): a forward of a dispatcher that uses
  collectives marks them, so a peer waiting there in a GPU-initiated forward learns that it waits in vain;
- the communication stream per GPU (`epmoe.dispatch.streams`): every exchange of the group runs there, in
  the order the host issued it, whichever layer issued it.

`group_state(group)` returns the one `GroupState` of a group in this process (created on first use; no
memory, no communication). This table is the only state epmoe keeps beyond the objects a caller holds;
nothing of one forward is kept here (that lives in the forward's handle).
"""
from __future__ import annotations

WRAP = 2 ** 31           # layer indices and forward numbers wrap here: they travel as int32 on the GPU


class GroupState:
    """The state the layers of one group share on this process (see the module docstring)."""

    def __init__(self) -> None:
        self.layers_built = 0
        self.forwards = 0
        self.workspaces: list = []        # the group's live SymmWorkspaces, in creation order (same on every rank)
        self.workspaces_made = 0
        self.default_workspace = None     # the one layers share when given none (`MoELayer(workspace=None)`)
        self.comm_streams: dict = {}      # device -> the group's `CommStream` there

    def next_forward(self) -> int:
        """The number of the forward being entered (every rank counts alike)."""
        self.forwards = (self.forwards + 1) % WRAP
        return self.forwards

    def adopt_forward(self, number: int) -> None:
        """Continue from `number` (after a mismatch every rank adopts the largest number any rank sent, so
        the group's next forward has the same number everywhere and no number is used twice)."""
        self.forwards = number % WRAP

    def next_layer(self, proposals: list[int]) -> int:
        """The index of the layer being built: the largest of every rank's proposal (a rank whose earlier
        build failed catches up), adopted here."""
        self.layers_built = max(proposals) % WRAP
        return self.layers_built

    def add_workspace(self, ws) -> None:
        """Register a workspace created on this group and give it its number (`ws.number`: 1, 2, ..., the
        same on every rank, since workspaces are created collectively)."""
        self.workspaces.append(ws)
        self.workspaces_made += 1
        ws.number = self.workspaces_made

    def remove_workspace(self, ws) -> None:
        self.workspaces = [w for w in self.workspaces if w is not ws]
        if self.default_workspace is ws:
            self.default_workspace = None

    def workspace_numbered(self, number: int):
        return next((w for w in self.workspaces if w.number == number), None)


_STATES: dict[tuple, GroupState] = {}


def group_state(group) -> GroupState:
    """The `GroupState` of `group` in this process (keyed by the group's ranks)."""
    import torch.distributed as dist
    key = tuple(dist.get_process_group_ranks(group))
    state = _STATES.get(key)
    if state is None:
        state = _STATES[key] = GroupState()
    return state
