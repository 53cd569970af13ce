"""One environment, one lifecycle: the steps every job walks, as plain Python functions.

provision (Pulumi, in infra/) -> configure -> deploy -> gate. Each step here takes an
`Environment` (the stack's spec with its hosts' addresses, from the spec or the provisioner's
outputs) and a list of host names, and returns one outcome per host. The CLI (`gpufleet up`,
`validate`, `configure`) and the Pulumi resources in infra/steps/ call these functions; they are
never copied. This package imports generators, validation and the spec, never infra or the CLI.

    environment = load_environment("lab", project_root=Path.cwd())
    report = up_environment(environment, say=print)
    raise SystemExit(report.exit_code)
"""
