"""`gpufleet rebuild --stack NAME --host HOST`: rebuild one GPU host from scratch, losing nothing.

check -> back up -> replace the machine -> configure -> deploy -> restore -> fill -> gate ->
verify. The configure, deploy and gate steps are the lifecycle's (gpufleet/lifecycle/); this
package holds what only a rebuild does: finding what the host alone holds (check.py), backing it
up with checksums verified after writing (backup.py), replacing the machine (replace.py, and
host_key.py for a static host's new SSH host key), restoring into the new stack (restore.py),
and comparing the registry before and after field by field (registry_snapshot.py). `run.py`
orchestrates them under the environment's lock and records progress (state.py) so that the same
command, run again after a failure, resumes from the backup already taken.

    report = rebuild_host(environment, "gpu-a", RebuildOptions(), say=print)
    raise SystemExit(report.exit_code)
"""
