"""The patient-disc burning daemon: DICOM receive -> durable queue -> burn -> read back."""
