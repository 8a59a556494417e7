"""Why a process stalls, from outside it: /proc, py-spy and pystack samples folded into a
verdict (diagnosis), the catalogue of hangs with their fixes (hangs), the machine's
hazards (doctor) and the bundle a stall leaves behind (hangbundle)."""
