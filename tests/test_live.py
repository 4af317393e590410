"""What a notebook user sees while a run goes: the cell is run in a real Jupyter kernel."""

import pytest

CELL = """
from ddp_helpers import TrainConfig, launch
result = launch(TrainConfig(world_size=2, epochs=2, train_subset=8192, test_subset=1000))
"""


@pytest.fixture
def kernel():
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(kernel_name="python3")
    yield client
    client.stop_channels()
    manager.shutdown_kernel(now=True)


def run_cell(client, code: str, timeout: float = 240) -> list[dict]:
    """Every output message of the cell, in order, up to the moment it finished."""
    msg_id, out = client.execute(code), []
    while True:
        msg = client.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return out
        out.append(msg)


def test_launch_in_a_notebook_shows_a_moving_bar_and_each_epoch_row_before_the_cell_ends(kernel, mnist_root):
    messages = run_cell(kernel, CELL)
    kinds = [m["msg_type"] for m in messages]
    assert "error" not in kinds, [m["content"] for m in messages if m["msg_type"] == "error"]
    bars = [m["content"]["data"]["text/plain"] for m in messages if m["msg_type"] in ("display_data",
                                                                                    "update_display_data")]
    assert len(set(bars)) >= 2 and "step" in bars[-1]  # the bar moved, and it is plain text
    assert "256/256" in bars[-1]  # 2 epochs x 128 steps per worker: it ends full
    stdout = "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream"
                     and m["content"]["name"] == "stdout")
    rows = [line for line in stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row.split()[0] for row in rows] == ["1", "2"] and "val acc" in stdout
    stderr = "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream"
                     and m["content"]["name"] == "stderr")
    assert stderr == ""  # no warning (IProgress or other) reaches the cell
