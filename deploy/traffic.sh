#!/bin/sh
# A steady mix for the compose stack: good predictions, slow ones, the model's 400s and 500s.
body='{"instances": [[5.1, 3.5, 1.4, 0.2]]}'
while true; do
    for i in 1 2 3 4 5 6 7 8 9 10; do
        case $i in
            7) curl -s -o /dev/null -X POST http://proxy:8080/invocations -H 'Content-Type: application/json' -d '{"instances": [[1]]}' ;;
            9) curl -s -o /dev/null -X POST http://proxy:8080/invocations -H 'X-Test-Status: 500' -d "$body" ;;
            *) curl -s -o /dev/null -X POST http://proxy:8080/invocations -H 'Content-Type: application/json' \
                   -H "X-Test-Delay-Ms: $((i * 7))" -d "$body" ;;
        esac
    done
    sleep 0.2
done
