"""The CTRL method as pure functions: noise schedules, the DDIM trajectory with its path KL,
the objective, reward composition, classifier calibration, sampling and the jitted train step.
`schedules`, `sampling` and `objective` use nothing but each other."""
