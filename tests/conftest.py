pytest_plugins = ["tests.support.s3_fixtures"]
