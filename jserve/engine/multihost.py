"""One engine over the devices of several processes: the leader schedules, the followers mirror it.

JAX's multi-controller model runs the same program on every process: each
jit call must be made by all of them, with the same inputs. Only the leader
(process 0) has requests, a scheduler and outputs. Every call it makes that
touches the devices after start-up (a step, a write of sampler slots, a
grammar mask upload, a prompt-logprob pass) is first broadcast to the
followers as a command and one packed int32 buffer. The followers run
`LLMEngine.follow()`, which repeats each command on their devices until the
leader sends STOP. Start-up (weights, KV pool, compiling every bucket) needs no
messages: it is the same code with the same arguments on every process.

Broadcasts go through `jax.experimental.multihost_utils` (a collective over
the processes' devices): a header [command, buffer length, argument], then the
buffer.
"""

import numpy as np

from sharding import distributed

STEP, SLOTS, MASK, PROMPT, STOP = range(5)
COMMAND_NAMES = {STEP: "step", SLOTS: "slots", MASK: "mask", PROMPT: "prompt", STOP: "stop"}


class LeaderChannel:
  """The leader's end: sends each device command to the followers before it runs it itself."""

  def send(self, command: int, buf_N: np.ndarray, arg: int = 0):
    buf_N = np.ascontiguousarray(buf_N, np.int32).ravel()
    distributed.broadcast_from_leader(np.array([command, buf_N.size, arg], np.int32))
    if buf_N.size:
      distributed.broadcast_from_leader(buf_N)


def receive() -> tuple[int, np.ndarray, int]:
  """The followers' end: the next (command, buffer, argument) the leader sent."""
  header = np.asarray(distributed.broadcast_from_leader(np.zeros(3, np.int32)))
  command, size, arg = (int(v) for v in header)
  buf_N = np.zeros(size, np.int32)
  if size:
    buf_N = np.asarray(distributed.broadcast_from_leader(buf_N))
  return command, buf_N, arg
