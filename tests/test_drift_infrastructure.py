"""The infrastructure layer of `gpufleet drift`: proxmox VMs in fakepve, azure preview digests.

What is real: fakepve (a fake PVE 9 API) over HTTPS, TLS verified against its certificate;
the stack file loaded from disk; the VMs made by the Proxmox dynamic provider's own `create`
(clone, config, start) as `pulumi up` would call it; every injected drift sent through the PVE
API (a config POST, stop/start, a destroy, a clone tagged by hand), and the repair by the
provider's read/diff/update, as `pulumi up --refresh` calls them; fakepve's seeded network
drops; a closed port, a wrong CA, a wrong token. The no-Pulumi-CLI path runs with a PATH that
has no `pulumi`.

What is not: no Pulumi engine and no Azure. The preview digests in tests/data/drift/ were
written by hand as copies of the documented `pulumi preview --json` format (Pulumi's
`PreviewDigest`: steps with op, urn, oldState, newState, diffReasons, replaceReasons,
detailedDiff; diagnostics with severity), not recorded from a run: the CLI cannot be installed
here; the Automation API (`pulumi.automation`, real) drives a stand-in `pulumi` script that
answers its calls as Pulumi 3.200 does and prints those digests. fakepve models no guest
agent in a clone (tests.test_proxmox_provider's `Agents` gives started VMs one) and runs PVE's
seconds 100x faster.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from gpufleet.drift.azure_preview import PreviewError, preview_checks
from gpufleet.drift.infrastructure import check_infrastructure, check_stack_infrastructure
from gpufleet.drift.items import DriftItem, LayerCheck
from gpufleet.lifecycle.environment import Environment
from gpufleet.spec.loading import LoadedStackSpec, load_stack_spec
from infra.proxmox import vm_config
from infra.proxmox.provider import GpuVmProvider
from infra.proxmox.session import PveSession
from tests.test_proxmox_provider import FAST, KEY, TEMPLATE, TOKEN_ID, TOKEN_SECRET, Agents

pytestmark = pytest.mark.fakepve(time_scale=0.01)

PROJECT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "drift"
STACK = "drift-test"
SECRET_ENV = {"GPUFLEET_PROXMOX_SECRET": TOKEN_SECRET}
TEMPLATE_CONFIG = {
    "scsi0": "local-lvm:base-9000-disk-0,size=32G",
    "scsihw": "virtio-scsi-pci",
    "ide2": "local-lvm:vm-9000-cloudinit,media=cdrom",
    "net0": "virtio=BC:24:11:00:90:00,bridge=vmbr0",
    "boot": "order=scsi0",
    "agent": "1",
    "cores": 2,
    "memory": "2048",
    "template": 1,
}


def _host(name: str, mapping: str, address: str) -> dict[str, Any]:
    return {
        "name": name,
        "gpus": {"model": "a10", "count": 1},
        "proxmox": {
            "node": "pve1",
            "cores": 16,
            "memory_mb": 65536,
            "disk_gb": 32,
            "network": {"bridge": "vmbr0", "vlan": 20, "ipv4": address, "gateway": "10.20.0.1"},
            "ssh_keys": [KEY],
            "pci": [{"mapping": mapping}],
        },
    }


HOSTS = [
    _host("gpu-a", "a10-pve1-0", "10.20.0.21/24"),
    _host("gpu-b", "a10-pve1-1", "10.20.0.22/24"),
    _host("gpu-c", "a10-pve1-2", "10.20.0.23/24"),
]


def write_stack(root: Path, url: str, cafile: str, **cluster: Any) -> LoadedStackSpec:
    """stacks/Pulumi.drift-test.yaml in root, as an operator writes it, loaded."""
    proxmox = {
        "endpoint": url,
        "ca_bundle": cafile,
        "token_id": TOKEN_ID,
        "template_vmid": TEMPLATE,
        "storage": "local-lvm",
        **cluster,
    }
    config = {
        "gpufleet:environment": "proxmox",
        "gpufleet:proxmox": proxmox,
        "gpufleet:hosts": HOSTS,
    }
    (root / "stacks").mkdir(exist_ok=True)
    (root / "stacks" / f"Pulumi.{STACK}.yaml").write_text(yaml.safe_dump({"config": config}))
    return load_stack_spec(root / "stacks", STACK)


def vm_inputs(loaded: LoadedStackSpec, host_name: str, cafile: str) -> dict[str, Any]:
    """The inputs the ProxmoxGpuHost component gives the provider for a host, secret included."""
    assert loaded.spec.proxmox is not None
    host = next(host for host in loaded.spec.hosts if host.name == host_name)
    inputs = vm_config.vm_inputs(
        STACK, host, loaded.spec.proxmox, ca_certificate=Path(cafile).read_text(encoding="utf-8")
    )
    return {**inputs, "secret": TOKEN_SECRET}


class Site:
    """The stack, its VMs made by the provider, and an API session to change them by hand."""

    def __init__(self, root: Path, loaded: LoadedStackSpec, cafile: str) -> None:
        self.root = root
        self.loaded = loaded
        self.cafile = cafile
        self.provider = GpuVmProvider(FAST)
        self.state: dict[str, tuple[str, dict[str, Any]]] = {}  # host -> (vmid, outputs)
        for host in HOSTS:
            result = self.provider.create(vm_inputs(loaded, host["name"], cafile))
            assert result.outs is not None
            self.state[host["name"]] = (str(result.id), result.outs)
        self.api = PveSession(vm_inputs(loaded, "gpu-a", cafile), FAST)

    def vmid(self, host: str) -> int:
        return int(self.state[host][0])

    def config(self, host: str, **params: Any) -> None:
        vmid = self.vmid(host)
        self.api.task("POST", f"nodes/pve1/qemu/{vmid}/config", "pve1", 30, **params)

    def restart(self, host: str) -> None:
        vmid = self.vmid(host)
        for action in ("stop", "start"):
            self.api.task("POST", f"nodes/pve1/qemu/{vmid}/status/{action}", "pve1", 30)

    def destroy(self, host: str) -> None:
        vmid = self.vmid(host)
        self.api.task("POST", f"nodes/pve1/qemu/{vmid}/status/stop", "pve1", 30)
        self.api.task("DELETE", f"nodes/pve1/qemu/{vmid}", "pve1", 30, purge=1)

    def clone(self, vmid: int, name: str, tags: str) -> None:
        """A VM made by hand: a clone of the template, tagged in a second call."""
        self.api.task(
            "POST", f"nodes/pve1/qemu/{TEMPLATE}/clone", "pve1", 30, newid=vmid, name=name, full=1
        )
        self.api.task("POST", f"nodes/pve1/qemu/{vmid}/config", "pve1", 30, tags=tags)

    def check(self, **options: Any) -> list[LayerCheck]:
        options.setdefault("environ", SECRET_ENV)
        options.setdefault("timing", FAST)
        return check_stack_infrastructure(self.loaded, project_root=self.root, **options)

    def pulumi_up_refresh(self, host: str, *, allow_restart: bool = False) -> None:
        """What `pulumi up --refresh -s drift-test` does with one host's VM: read (refresh),
        then create a gone VM, or diff and update a drifted one."""
        vmid, outs = self.state[host]
        news = vm_inputs(self.loaded, host, self.cafile) | {"allow_restart": allow_restart}
        read = self.provider.read(vmid, outs)
        if not read.id:
            created = self.provider.create(news)
            assert created.outs is not None
            self.state[host] = (str(created.id), created.outs)
            return
        assert read.outs is not None
        if self.provider.diff(vmid, read.outs, news).changes:
            updated = self.provider.update(vmid, read.outs, news)
            assert updated.outs is not None
            self.state[host] = (vmid, updated.outs)


@pytest.fixture
def pve(fakepve: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Nodes pve1 and pve2, the cloud-image template, the provisioner's token; started VMs
    get a guest agent (the provider's create waits for it)."""
    fakepve.add_node("pve2")
    fakepve.apitokens[TOKEN_ID] = TOKEN_SECRET
    fakepve.add_vm(TEMPLATE, "debian-13-cloud", node="pve1", template=True, config=TEMPLATE_CONFIG)
    monkeypatch.setattr(fakepve, "_do_start", Agents(fakepve).start)
    return fakepve


@pytest.fixture
def site(pve: Any, fakepve_url: str, fakepve_cafile: str, tmp_path: Path) -> Site:
    return Site(tmp_path, write_stack(tmp_path, fakepve_url, fakepve_cafile), fakepve_cafile)


def items_of(checks: list[LayerCheck]) -> list[DriftItem]:
    return [item for check in checks for item in check.items]


def by_host(checks: list[LayerCheck]) -> dict[str, LayerCheck]:
    return {check.host: check for check in checks}


def assert_well_formed(checks: list[LayerCheck]) -> None:
    """What the report relies on: each item in its host's check, its object a checked one."""
    for check in checks:
        assert check.layer == "infrastructure"
        assert len(set(check.checked)) == len(check.checked), check.checked
        for item in check.items:
            assert item.layer == "infrastructure"
            assert item.host == check.host
            assert item.object in check.checked
            assert item.repair


# ------------------------------------------------------------------------- proxmox


def test_a_clean_stack_reports_no_drift(site: Site) -> None:
    checks = site.check()
    assert_well_formed(checks)
    assert [check.host for check in checks] == ["", "gpu-a", "gpu-b", "gpu-c"]
    assert items_of(checks) == []
    assert [check.error for check in checks] == [None] * 4
    assert by_host(checks)[""].checked == [f"vms tagged gpufleet-{STACK}"]
    checked = by_host(checks)["gpu-b"].checked
    assert checked[0] == "vm gpu-b"
    assert {"vm gpu-b cores", "vm gpu-b memory_mb", "vm gpu-b pci", "vm gpu-b network"} <= set(
        checked
    )
    assert {"vm gpu-b tags", "vm gpu-b pending"} <= set(checked)


def test_memory_changed_and_restarted_is_drift_of_that_vm(site: Site) -> None:
    site.config("gpu-b", memory=32768)
    site.restart("gpu-b")
    [item] = items_of(site.check())
    assert (item.host, item.object) == ("gpu-b", "vm gpu-b memory_mb")
    assert (item.expected, item.found) == ("65536 MiB", "32768 MiB")
    vmid = site.vmid("gpu-b")
    assert item.repair == (
        f"pulumi up --refresh -s {STACK}, then `qm reboot {vmid}` on node pve1 "
        "(PVE applies it at a restart)"
    )
    site.pulumi_up_refresh("gpu-b", allow_restart=True)  # what the repair does
    assert items_of(site.check()) == []


def test_a_removed_hostpci_is_drift_of_the_gpus(site: Site) -> None:
    site.config("gpu-c", delete="hostpci0")
    site.restart("gpu-c")
    checks = site.check()
    assert_well_formed(checks)
    [item] = items_of(checks)
    assert (item.host, item.object) == ("gpu-c", "vm gpu-c pci")
    assert (item.expected, item.found) == ("hostpci0 mapping=a10-pve1-2", "no GPU")
    site.pulumi_up_refresh("gpu-c", allow_restart=True)
    assert items_of(site.check()) == []


def test_a_change_waiting_for_a_restart_is_pending_drift(site: Site) -> None:
    site.config("gpu-a", cores=4)  # the VM runs: PVE holds the change back
    [item] = items_of(site.check())
    assert (item.host, item.object) == ("gpu-a", "vm gpu-a pending")
    assert item.found == "cores: 16 -> 4"
    vmid = site.vmid("gpu-a")
    # Not the spec's value: revert it rather than restart into it.
    assert item.repair == (
        f"`qm set {vmid} --revert cores` on node pve1, then pulumi up --refresh -s {STACK}"
    )


def test_a_pending_change_that_restores_the_spec_is_repaired_by_a_restart(site: Site) -> None:
    site.config("gpu-a", memory=32768)
    site.restart("gpu-a")
    site.pulumi_up_refresh("gpu-a")  # without allow_restart: the spec's memory waits
    checks = site.check()
    assert_well_formed(checks)
    memory, pending = items_of(checks)
    assert (memory.object, memory.found) == ("vm gpu-a memory_mb", "32768 MiB")
    assert (pending.object, pending.found) == ("vm gpu-a pending", "memory: 32768 -> 65536")
    vmid = site.vmid("gpu-a")
    assert pending.repair == f"`qm reboot {vmid}` on node pve1 (PVE applies them at the restart)"
    site.api.task("POST", f"nodes/pve1/qemu/{vmid}/status/reboot", "pve1", 30)
    assert items_of(site.check()) == []


def test_edited_tags_and_network_are_drift_not_a_missing_vm(site: Site) -> None:
    site.config("gpu-a", tags=f"gpufleet-{STACK}")  # the host tag removed
    site.config("gpu-b", net0="virtio,bridge=vmbr1,tag=30")
    site.restart("gpu-b")
    checks = site.check()
    assert_well_formed(checks)
    tags, network = items_of(checks)
    assert (tags.host, tags.object) == ("gpu-a", "vm gpu-a tags")
    assert (tags.expected, tags.found) == (
        f"gpufleet-{STACK};gpufleet-host-gpu-a",
        f"gpufleet-{STACK}",
    )
    assert tags.repair == f"pulumi up --refresh -s {STACK}"  # tags change on a running VM
    assert (network.host, network.object) == ("gpu-b", "vm gpu-b network")
    assert network.expected == "bridge=vmbr0 vlan=20 ipv4=10.20.0.22/24 gateway=10.20.0.1"
    assert network.found == "bridge=vmbr1 vlan=30 ipv4=10.20.0.22/24 gateway=10.20.0.1"
    site.pulumi_up_refresh("gpu-a")
    site.pulumi_up_refresh("gpu-b", allow_restart=True)
    assert items_of(site.check()) == []


def test_a_deleted_vm_is_missing(site: Site) -> None:
    site.destroy("gpu-a")
    # Another stack's VM of the same name is not taken for it.
    site.clone(160, "gpu-a", "gpufleet-other-stack;gpufleet-host-gpu-a")
    checks = site.check()
    assert_well_formed(checks)
    [item] = items_of(checks)
    assert (item.host, item.object, item.found) == ("gpu-a", "vm gpu-a", "no VM carries those tags")
    assert item.expected == (f"a VM on node pve1 tagged gpufleet-{STACK};gpufleet-host-gpu-a")
    assert item.repair.startswith(f"pulumi up --refresh -s {STACK} ")
    assert by_host(checks)["gpu-a"].checked == ["vm gpu-a"]
    site.pulumi_up_refresh("gpu-a")
    assert items_of(site.check()) == []


def test_an_extra_vm_with_the_stacks_tags_is_reported(site: Site) -> None:
    site.clone(150, "old-gpu", f"gpufleet-{STACK};gpufleet-host-old-gpu")
    site.clone(151, "gpu-b", f"gpufleet-{STACK};gpufleet-host-gpu-b")  # a second gpu-b
    site.clone(152, "someone-elses", "gpufleet-other-stack;gpufleet-host-x")
    checks = site.check()
    assert_well_formed(checks)
    stray, second = items_of(checks)
    assert (stray.host, stray.object) == ("", "extra vm 150")
    assert stray.found == (
        f"VM 150 (old-gpu) on node pve1, tagged gpufleet-{STACK};gpufleet-host-old-gpu: no host "
        "of the spec claims it"
    )
    assert "`qm stop 150 && qm destroy 150 --purge` on node pve1" in stray.repair
    assert (second.host, second.object) == ("gpu-b", "extra vm 151")
    # The VM the provider made is still the one compared: gpu-b has no other item.
    assert [i.object for i in by_host(checks)["gpu-b"].items] == ["extra vm 151"]


def test_every_injection_at_once_each_on_its_own_host(site: Site) -> None:
    site.config("gpu-a", cores=4)
    site.config("gpu-b", memory=32768, delete="hostpci0")
    site.restart("gpu-b")
    site.destroy("gpu-c")
    site.clone(150, "old-gpu", f"gpufleet-{STACK};gpufleet-host-old-gpu")
    checks = site.check()
    assert_well_formed(checks)
    assert sorted((item.host, item.object) for item in items_of(checks)) == [
        ("", "extra vm 150"),
        ("gpu-a", "vm gpu-a pending"),
        ("gpu-b", "vm gpu-b memory_mb"),
        ("gpu-b", "vm gpu-b pci"),
        ("gpu-c", "vm gpu-c"),
    ]


def test_a_password_login_checks_too(site: Site, pve: Any, fakepve_url: str) -> None:
    """root@pam with a password: each worker's session logs in for a ticket of its own."""
    site.loaded = write_stack(site.root, fakepve_url, site.cafile, token_id=None, user="root@pam")
    site.config("gpu-a", memory=32768)
    site.restart("gpu-a")
    pve.requests.clear()
    checks = site.check(environ={"GPUFLEET_PROXMOX_SECRET": "secret"}, workers=2)
    assert [(i.host, i.object) for i in items_of(checks)] == [("gpu-a", "vm gpu-a memory_mb")]
    logins = [r for r in pve.requests if r[0] == "POST" and r[1].endswith("/access/ticket")]
    assert 2 <= len(logins) <= 3  # the listing's session, and one per worker that ran
    assert all(b"secret" not in body for _, _, body in logins)


def test_a_read_only_token_is_enough(site: Site, pve: Any, fakepve_url: str) -> None:
    """A token holding VM.Audit on /vms and nothing else checks the whole stack."""
    site.destroy("gpu-c")  # before the first grant: from then on the fake enforces ACLs
    reader = "drift@pve!reader"
    pve.apitokens[reader] = "reader-token-for-the-fake"
    pve.grant(reader, "/vms", "VM.Audit")
    site.loaded = write_stack(site.root, fakepve_url, site.cafile, token_id=reader)
    checks = site.check(environ={"GPUFLEET_PROXMOX_SECRET": "reader-token-for-the-fake"})
    assert [check.error for check in checks] == [None] * 4
    assert [(i.host, i.object) for i in items_of(checks)] == [("gpu-c", "vm gpu-c")]


def test_a_vm_that_cannot_be_read_fails_only_its_host(site: Site, pve: Any) -> None:
    vmid = site.vmid("gpu-b")
    pve.fail("GET", f"/nodes/pve1/qemu/{vmid}/config", 500, "got timeout reading the config")
    checks = by_host(site.check())
    error = checks["gpu-b"].error
    assert error is not None
    assert error.startswith(f"could not be checked: reading VM {vmid} on node pve1: ")
    assert "got timeout reading the config" in error
    assert [checks[h].error for h in ("", "gpu-a", "gpu-c")] == [None, None, None]
    assert len(checks["gpu-a"].checked) > 1


def test_a_flaky_network_is_retried(site: Site, pve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """fakepve resets a seeded fifth of the connections before PVE sees them; the GETs are
    sent again (the provider's backoff) and the check comes out clean."""
    sent: list[str] = []
    send = requests.Session.send

    def counting(session: requests.Session, request: Any, **options: Any) -> Any:
        sent.append(str(request.method))
        return send(session, request, **options)

    monkeypatch.setattr(requests.Session, "send", counting)
    pve.requests.clear()
    pve.flaky_network(drop_rate=0.2, seed=16)
    pve._random.seed(16)  # fakepve applies the seed when it starts; this one runs already
    checks = site.check()
    assert [check.error for check in checks] == [None] * 4
    assert items_of(checks) == []
    answered = [r for r in pve.requests if r[0] == "GET"]
    assert len(answered) == 1 + 2 * len(HOSTS)  # the listing, then config and pending per VM
    assert sent.count("GET") > len(answered)  # the dropped ones, sent again


def test_an_unreachable_api_is_an_error_that_says_what_to_do(
    pve: Any, fakepve_cafile: str, tmp_path: Path
) -> None:
    loaded = write_stack(tmp_path, "https://127.0.0.1:9", fakepve_cafile)
    [check] = check_stack_infrastructure(
        loaded, project_root=tmp_path, environ=SECRET_ENV, timing=FAST
    )
    assert (check.host, check.items) == ("", [])
    assert check.error is not None
    assert check.error.startswith("could not be checked: cannot reach https://127.0.0.1:9 (")
    assert "check proxmox.endpoint (host and port) and that pveproxy runs there" in check.error
    assert check.error.endswith("(the VMs of gpu-a, gpu-b, gpu-c were not compared with the spec)")


@pytest.mark.parametrize(
    ("environ", "ca", "expected"),
    [
        ({"GPUFLEET_PROXMOX_SECRET": "wrong"}, None, "the API refused the login: 401"),
        ({}, None, "GPUFLEET_PROXMOX_SECRET is not set: export the secret of API token"),
        (SECRET_ENV, "other", "TLS verification of https://127.0.0.1:"),
    ],
    ids=["bad-token", "no-secret", "untrusted-ca"],
)
def test_bad_credentials_or_trust_are_an_error(
    site: Site,
    fakepve_url: str,
    tmp_path: Path,
    environ: dict[str, str],
    ca: str | None,
    expected: str,
) -> None:
    if ca == "other":
        from fakepve.certs import make_cert

        (tmp_path / "other-ca").mkdir()
        other = str(make_cert(str(tmp_path / "other-ca"), hosts=("127.0.0.1",))[0])
        site.loaded = write_stack(tmp_path, fakepve_url, other)
    [check] = site.check(environ=environ)
    assert check.error is not None
    assert check.error.startswith("could not be checked: ")
    assert expected in check.error
    assert TOKEN_SECRET not in check.error


def test_the_environment_entry_needs_no_address(site: Site) -> None:
    """check_infrastructure takes an Environment; the hosts have no address (the provisioner's
    outputs were never read) and the check does not need one."""
    environment = Environment(site.loaded, [], site.root)
    assert all(host.address is None for host in environment.spec.hosts)
    site.destroy("gpu-b")
    checks = check_infrastructure(environment, environ=SECRET_ENV)
    assert [(i.host, i.object) for i in items_of(checks)] == [("gpu-b", "vm gpu-b")]


def test_static_and_local_stacks_have_no_infrastructure_layer() -> None:
    for stack in ("lab", "local"):
        loaded = load_stack_spec(PROJECT / "stacks", stack)
        assert check_stack_infrastructure(loaded, project_root=PROJECT) == []


# --------------------------------------------------------------------------- azure


def digest(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


def test_azure_without_the_pulumi_cli_is_not_checked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no `pulumi` on it
    loaded = load_stack_spec(PROJECT / "stacks", "azure-dev")
    [check] = check_stack_infrastructure(loaded, project_root=PROJECT)
    assert (check.host, check.items, check.checked) == ("", [], [])
    assert check.error is not None
    assert check.error.startswith("not checked: no Pulumi CLI (install it from https://")


STAND_IN_PULUMI = """#!{python}
# A stand-in for the Pulumi CLI: the Automation API's calls, answered as Pulumi 3.200 does
# (a file-based event log), with the digest the test put in GPUFLEET_TEST_DIGEST.
import json, os, sys
args = [arg for arg in sys.argv[1:] if arg != "--non-interactive"]
with open(os.environ["GPUFLEET_TEST_CALLS"], "a") as calls:
    calls.write(json.dumps(args) + "\\n")
if args[:1] == ["version"]:
    print("v3.200.0")
elif args[:2] == ["stack", "select"] and os.environ.get("GPUFLEET_TEST_NO_STACK"):
    print("error: no stack named 'azure-dev' found", file=sys.stderr)
    sys.exit(255)
elif args[:1] == ["preview"]:
    digest = json.load(open(os.environ["GPUFLEET_TEST_DIGEST"]))
    changes = {{k: v for k, v in digest.get("changeSummary", {{}}).items() if k != "same"}}
    log = args[args.index("--event-log") + 1]
    with open(log, "a") as events:
        summary = {{"maybeCorrupt": False, "durationSeconds": 1, "resourceChanges": changes}}
        events.write(json.dumps({{"sequence": 1, "timestamp": 1, "summaryEvent": summary}}) + "\\n")
        events.write(json.dumps({{"sequence": 2, "timestamp": 1, "cancelEvent": {{}}}}) + "\\n")
    print(json.dumps(digest, indent=4))
    if changes or digest.get("diagnostics"):
        print("error: no changes were expected but changes were proposed", file=sys.stderr)
        sys.exit(255)
"""


@pytest.fixture
def pulumi_calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The stand-in `pulumi` first on PATH; the file its calls are written to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "pulumi"
    stand_in.write_text(STAND_IN_PULUMI.format(python=sys.executable))
    stand_in.chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("GPUFLEET_TEST_CALLS", str(calls))
    return calls


@pytest.mark.parametrize(
    ("digest_file", "items"), [("preview-clean.json", 0), ("preview-drift.json", 4)]
)
def test_the_preview_runs_through_the_automation_api(
    monkeypatch: pytest.MonkeyPatch, pulumi_calls: Path, digest_file: str, items: int
) -> None:
    """The Automation API drives a stand-in `pulumi` (the CLI cannot be installed here): the
    arguments it gets, and a digest read whether the exit code is 0 or 255."""
    monkeypatch.setenv("GPUFLEET_TEST_DIGEST", str(DATA / digest_file))
    loaded = load_stack_spec(PROJECT / "stacks", "azure-dev")
    checks = check_stack_infrastructure(loaded, project_root=PROJECT)
    assert_well_formed(checks)
    assert [check.error for check in checks] == [None] * len(checks)
    assert len(items_of(checks)) == items
    calls = [json.loads(line) for line in pulumi_calls.read_text().splitlines()]
    preview = next(call for call in calls if call[0] == "preview")
    assert {"--refresh", "--expect-no-changes", "--json"} <= set(preview)
    assert preview[preview.index("--stack") + 1] == "azure-dev"


def test_a_preview_that_cannot_run_is_could_not_check(
    monkeypatch: pytest.MonkeyPatch, pulumi_calls: Path
) -> None:
    """The stand-in CLI exits 255 as Pulumi does for a stack its backend does not have."""
    monkeypatch.setenv("GPUFLEET_TEST_NO_STACK", "1")
    loaded = load_stack_spec(PROJECT / "stacks", "azure-dev")
    [check] = check_stack_infrastructure(loaded, project_root=PROJECT)
    assert check.error == (
        "could not be checked: pulumi preview -s azure-dev failed: "
        "error: no stack named 'azure-dev' found"
    )


def test_a_clean_preview_is_no_drift() -> None:
    checks = preview_checks("azure-dev", digest("preview-clean.json"), ["az-dev-t4-1"])
    assert_well_formed(checks)
    assert items_of(checks) == []
    assert [check.error for check in checks] == [None, None]
    assert by_host(checks)["az-dev-t4-1"].checked == [
        "gpufleet:azure:GpuHost az-dev-t4-1",
        "azure-native:network:NetworkInterface az-dev-t4-1-nic",
        "azure-native:compute:VirtualMachine az-dev-t4-1-vm",
    ]
    assert "azure-native:resources:ResourceGroup gpufleet-dev" in by_host(checks)[""].checked


def test_preview_changes_become_items_per_resource() -> None:
    checks = preview_checks(
        "azure-dev", digest("preview-drift.json"), ["az-dev-t4-1", "az-dev-a10-frac"]
    )
    assert_well_formed(checks)
    items = {item.object: item for item in items_of(checks)}
    assert set(items) == {
        "azure-native:compute:VirtualMachine az-dev-t4-1-vm",
        "azure-native:network:NetworkInterface az-dev-t4-1-nic",
        "azure-native:compute:Disk az-dev-a10-frac-data",
        "azure-native:network:NetworkSecurityGroup gpufleet-dev-nsg",
    }
    vm = items["azure-native:compute:VirtualMachine az-dev-t4-1-vm"]
    assert vm.host == "az-dev-t4-1"
    assert vm.expected == (
        "hardwareProfile.vmSize=Standard_NC4as_T4_v3; tags.owner=ml-platform; osProfile.adminPassword=[secret]"
    )
    assert vm.found == (
        "update: hardwareProfile.vmSize=Standard_NC8as_T4_v3; tags.owner=someone; "
        "osProfile.adminPassword=[secret]"
    )
    assert vm.repair == "pulumi up --refresh -s azure-dev"
    nic = items["azure-native:network:NetworkInterface az-dev-t4-1-nic"]
    assert nic.found.startswith("replace: ")
    assert nic.repair == "pulumi up --refresh -s azure-dev (replaces the resource)"
    disk = items["azure-native:compute:Disk az-dev-a10-frac-data"]
    assert (disk.host, disk.found) == ("az-dev-a10-frac", "gone from Azure and the state")
    nsg = items["azure-native:network:NetworkSecurityGroup gpufleet-dev-nsg"]
    assert nsg.host == ""
    assert nsg.found == "update: securityRules[0].sourceAddressPrefix=0.0.0.0/0"
    assert "hunter2" not in repr(checks)


def test_preview_errors_are_could_not_check() -> None:
    checks = preview_checks("azure-dev", digest("preview-error.json"), ["az-dev-t4-1"])
    wide = by_host(checks)[""]
    assert wide.error == (
        "could not be checked: pulumi preview -s azure-dev reported: azure-native:"
        "compute:VirtualMachine resource 'az-dev-t4-1-vm': AuthorizationFailed: the client has no "
        "authorization to perform action 'Microsoft.Compute/virtualMachines/read'"
    )


def test_output_that_is_not_a_digest_is_could_not_check(tmp_path: Path) -> None:
    loaded = load_stack_spec(PROJECT / "stacks", "azure-dev")
    [check] = check_stack_infrastructure(
        loaded, project_root=tmp_path, run_preview=lambda stack, root: "error: no stack named"
    )
    assert check.error is not None
    assert check.error.startswith("could not be checked: pulumi preview printed no JSON digest")
    with pytest.raises(PreviewError, match="not a preview digest"):
        preview_checks("azure-dev", "[]", [])
