"""What runs inside a serving image: the ``entrypoint`` supervisor and the ``sitecustomize``
hook that lets stock ``mlflow models build-docker`` images switch mode from the environment."""
