"""Why a process stalls, from outside it: the process to look at (target), its /proc
state (proc) and stacks (stacks), sampled and folded into a verdict (diagnosis) by the
catalogue of hangs with their fixes (hangs); the machine's hazards (doctor) and the
bundle a stall leaves behind (hangbundle)."""
