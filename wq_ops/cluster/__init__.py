"""Running a job across actors: the driver, the plan, the runtimes (Ray, or in-process) and the actor that
hosts the block pipelines. Entry point: `wq_ops.cluster.driver.run_job`."""
