module minutely.test/hmetrics-client

go 1.24.0

require github.com/heroku/x v0.5.3
