"""`pulumi up -s <stack>`: bring the stack's hosts to its StackSpec (see infra/program.py)."""

import pulumi

from infra.program import build_stack

build_stack(pulumi.get_stack())
