"""dask over the network: tls:// schedulers use dask's own TLS settings, tcp:// is warned about.

dask's protocol unpickles what it receives, so a scheduler reachable by untrusted hosts runs
their code; these tests pin down that ditf never connects to a TLS scheduler without
certificates, really talks mutual TLS when they are configured, and keeps local clusters on
loopback.
"""

from __future__ import annotations

import dask
import pytest

distributed = pytest.importorskip("distributed")
pytest.importorskip("cryptography")  # Security.temporary() makes its certificates with it

from ditf_pipeline.distributed.runners import dask_client, scheduler_security  # noqa: E402
from ditf_pipeline.core.errors import DitfError  # noqa: E402


def _square(x: int) -> int:
    return x * x


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    """A local cluster that accepts only mutual-TLS connections, and its PEM files on disk."""
    from distributed import LocalCluster, Security

    security = Security.temporary()
    folder = tmp_path_factory.mktemp("tls")
    files = {}
    for name, pem in {"ca": security.tls_ca_file, "cert": security.tls_client_cert, "key": security.tls_client_key}.items():
        path = folder / f"{name}.pem"
        path.write_text(pem)
        files[name] = str(path)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tls://", host="127.0.0.1",
                      security=security, dashboard_address=None) as cluster:
        yield cluster.scheduler_address, files


def test_tls_scheduler_without_settings_is_one_clear_error(tls_cluster):
    address, _ = tls_cluster
    assert address.startswith("tls://")
    with dask.config.set({"distributed.comm.tls.ca-file": None, "distributed.comm.tls.client.cert": None,
                          "distributed.comm.tls.client.key": None}):
        with pytest.raises(DitfError, match="uses TLS: set dask's TLS settings"):
            with dask_client(scheduler=address):
                pass


def test_tls_scheduler_with_dask_settings_runs_tasks(tls_cluster):
    address, files = tls_cluster
    with dask.config.set({"distributed.comm.tls.ca-file": files["ca"], "distributed.comm.tls.client.cert": files["cert"],
                          "distributed.comm.tls.client.key": files["key"]}):
        with dask_client(scheduler=address) as client:
            assert client.submit(_square, 7).result(timeout=30) == 49
            assert client.scheduler.address.startswith("tls://")


def test_plain_tcp_to_a_remote_host_is_warned_about(capsys):
    assert scheduler_security("tcp://10.1.2.3:8786") is None
    assert "only trusted hosts" in capsys.readouterr().err
    assert scheduler_security("tcp://127.0.0.1:8786") is None
    assert capsys.readouterr().err == ""


def test_unknown_scheduler_protocol_is_refused():
    with pytest.raises(DitfError, match="unknown protocol 'http'"):
        scheduler_security("http://head:8786")


@pytest.mark.parametrize("gpus", [[], ["0"]], ids=["cpu", "gpu-pinned"])
def test_local_clusters_listen_on_loopback_only(gpus):
    """Both local cluster flavours (plain, and one worker pinned per GPU) bind to 127.0.0.1."""
    from ditf_pipeline.distributed.runners import local_cluster

    with local_cluster(1, gpus=gpus) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        assert all(w.startswith("tcp://127.0.0.1:") for w in cluster.scheduler_info["workers"])
