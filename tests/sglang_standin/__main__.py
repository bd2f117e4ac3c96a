from tests.sglang_standin.server import main

main()
