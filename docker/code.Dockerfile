# The project's code for the NGC Triton image on Kubernetes (deploy/k8s): compose bind-mounts the repository
# at /workspace; a pod gets the same tree from this image through an init container that copies it into an
# emptyDir. The NGC image itself stays exactly the pinned one.
#   docker build -f docker/code.Dockerfile -t gemma3-code .
FROM busybox:1.37

COPY pyproject.toml /workspace/
COPY gemma3_core /workspace/gemma3_core
COPY triton_io /workspace/triton_io
COPY build_engine /workspace/build_engine
COPY model_repository /workspace/model_repository

USER 65532
CMD ["cp", "-a", "/workspace/.", "/mnt/workspace/"]
