"""pyeff.hw: the FPGA/ASIC cycle and energy model that mirrors pyeff's kernels (AutoDNNchip).

Its content arrives with the AutoDNNchip work; this package exists so that the layout is stable."""
