"""The audit loop: label a stratified sample of mined pairs, estimate the noise rate with a 95% interval,
refit the calibrator on the labels (`python -m qa.audit sample | serve | label | fit | export | import`)."""
