"""The team's tracking server: PostgreSQL (Debian's packages) as MLflow's backend store and a
`mlflow server --serve-artifacts` on localhost (conftest's team_server), and the command that serves
the pair.

The server is tested for real in test_multinode.py, where every node logs to it: the submitted
2-worker fine-tune is read back through the server alone from an empty folder (record, artifacts,
bytes in the server's artifact destination, the released model by run id), and a sweep of two
concurrent trials logs every step through it. (A fit of its own here repeated that one, 23 s.)
"""

from __future__ import annotations

def test_the_cli_serves_the_same_pair(tmp_path):
    from panacea_platform.cli import build_parser

    args = build_parser().parse_args(["tracking-server", "--data", str(tmp_path), "--port", "5123"])
    assert args.func.__name__ == "cmd_tracking_server" and args.port == 5123 and args.db_port == 5432
