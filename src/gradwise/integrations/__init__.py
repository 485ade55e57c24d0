"""The doctor inside other frameworks' training loops, one line each.

    from gradwise.integrations.lightning import DoctorCallback      # lightning.Trainer(callbacks=[...])
    from gradwise.integrations.transformers import DoctorCallback   # transformers.Trainer(callbacks=[...])
    from gradwise.integrations.keras import DoctorCallback          # model.fit(..., callbacks=[...])
    from gradwise.integrations.jax import Doctor                    # doctor.step(loss, grads=..., ...)

Each submodule imports its framework only when imported itself. Lightning and the Hugging Face
Trainer run the PyTorch ``gradwise.Doctor``; Keras and JAX feed the same rules from the outside
(``gradwise.doctor.numeric``). All of them write ``doctor/findings.json`` and
``doctor/telemetry.json`` into a run directory that ``gradwise report`` renders.
"""
