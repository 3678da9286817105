"""Calibration: run the model on sample text, one decoder layer at a time, and keep the input
statistics of every linear module (the input Hessian XᵀX and its diagonal) for GPTQ,
activation-weighted rounding and the output-error budget. The stage is `stages/calibrate.py`;
this package holds the model side (`layers`) and the sample side (`samples`)."""
