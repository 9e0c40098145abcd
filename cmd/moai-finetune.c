/* moai-finetune.c - the command line (placeholder until the foundation lands). */
#include <stdio.h>

int main(void)
{
    puts("moai-finetune");
    return 0;
}
