"""Multi-node launch on one machine: two torchrun "nodes" of one process each, c10d rendezvous
on 127.0.0.1, gloo: training proceeds and the ranks end with identical parameters."""

import socket
import subprocess

import pytest

from conftest import ROOT, TINY, TORCHRUN, env, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_one_process_each(tmp_path):
    out = tmp_path / "mn"
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [
            TORCHRUN,
            "--nnodes=2",
            "--nproc_per_node=1",
            f"--node_rank={node}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}",
            "--rdzv_id=fastssl-test",
            "fastssl/train.py",
            "--config",
            "configs/sc/builtin.yaml",
            f"out_dir={out}",
            *TINY,
            "train.max_steps=6",
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "2 x cpu" in outs[0] + outs[1]
    recs = read_metrics(out)
    assert max(r["step"] for r in recs) == 6
    assert [r["ranks_agree"] for r in recs if "ranks_agree" in r] == [1.0]
