"""ΔW analysis from run directories; never imports the training code (`lowrank`).

runs.py (read run dirs) -> spectra.py, subspace.py, amplification.py (pure math over tensors) -> report.py (CLI:
`python -m analysis.report RUNS_ROOT ... --out DIR`, writes the tables figures are built from).
"""
