"""GPRL learner side: GPM score math, GPRL advantages, drift control, the HTTP client."""
